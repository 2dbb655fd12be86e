"""Notebooks run top to bottom (the tiny preset) through the library, as a user would."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks')


def _execute(name):
  """Runs a notebook top to bottom (committed with outputs stripped); its code outputs."""
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  assert all(not c.get('outputs') for c in notebook.cells if c.cell_type == 'code'), \
      'commit notebooks with outputs stripped'
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  return outputs


def test_quickstart_runs(mnist_arrays_dir, monkeypatch):
  monkeypatch.setenv('RDSKD_DATA_DIR', mnist_arrays_dir)  # No TensorFlow in the kernel.
  monkeypatch.setenv('RDSKD_NOTEBOOK_PRESET', 'tiny')
  outputs = _execute('quickstart.ipynb')
  assert any('image/png' in o.get('data', {}) for o in outputs)
  assert any('test_accuracy' in o.get('text', '') for o in outputs)
  assert any('frechet_distance_to_test' in o.get('text', '') for o in outputs)


def test_losses_notebook_runs():
  outputs = _execute('losses.ipynb')
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 4
  assert any('at its own references' in o.get('text', '') for o in outputs)
