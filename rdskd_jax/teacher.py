"""Teachers from outside: PyTorch state_dicts and Flax modules.

A PyTorch state_dict (`.safetensors`, read without torch; `.pt`/`.pth`, read through torch)
maps onto the registry's networks under the key names of the public data-free KD code:

    lenet5, lenet5_half   conv1, conv2, conv3, fc1, fc2 (DAFL's and RDSKD's lenet.py)
    wrn_D_K               conv1, block1.layer.0.bn1 ... .convShortcut, bn1, fc (wresnet.py)
    resnet18, resnet34    conv1, bn1, layer1.0.conv1 ... .shortcut.0/.1, linear (resnet.py)

Layouts are converted (conv OIHW -> HWIO, Linear (out, in) -> (in, out), a flatten of CHW
features -> HWC), BatchNorm running statistics are loaded, and every key is accounted for:
a missing, unexpected or mis-shaped one is a ConfigError naming it. For another
architecture, write it as a Flax module and give `from_state_dict` a `names` function
from each Flax module name to its PyTorch prefix (README, "Distil your own teacher").

    python -m rdskd_jax.teacher convert IN --model=wrn_40_2 --out=DIR [--dataset=cifar10 ...]

writes DIR as our `teacher_variables` (what `config.teacher.checkpoint` takes) and, given
a dataset, prints the converted teacher's accuracy on its test split.

A Flax module teacher, from Python: `train.train_and_evaluate(config, workdir,
teacher=(module, variables))`. The contract: `module.apply(variables, images,
train=False)` returns `(logits, features)`, logits (N, num_classes) and features (N, F)
the activations its fully connected head reads; images are NHWC float32, normalised with `config.mean` and
`config.std` as the teacher was trained.
"""

import argparse
import hashlib
import os
import re
import sys
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from rdskd_jax import models
from rdskd_jax import workdir as workdir_lib
from rdskd_jax.errors import ConfigError, run_reporting_errors

STATE_DICT_SUFFIXES = ('.safetensors', '.pt', '.pth')
_HOW_TO_CONVERT = ('convert it where torch is installed: python -c "import torch; from '
                   'safetensors.torch import save_file; save_file(torch.load(\'IN.pth\', '
                   'map_location=\'cpu\'), \'OUT.safetensors\')"')


def is_state_dict_file(path: str) -> bool:
  return path.endswith(STATE_DICT_SUFFIXES)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: float32 array} of a PyTorch state_dict file (a `module.` prefix, as
  DataParallel saves it, is dropped)."""
  if not os.path.isfile(path):
    raise ConfigError(f'teacher file {path!r}: no such file')
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConfigError(f'teacher file {path!r}: not a readable safetensors file '
                        f'({str(e).splitlines()[0]})') from None
  else:
    state = _read_with_torch(path)
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state


def _read_with_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ConfigError(f'teacher file {path!r}: reading .pt/.pth needs torch, which is not '
                      f'installed; pip install torch, or {_HOW_TO_CONVERT}') from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for unreadable files.
    raise ConfigError(f'teacher file {path!r}: torch cannot read it '
                      f'({type(e).__name__}: {str(e).splitlines()[0][:120]})') from None
  if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
    loaded = loaded['state_dict']  # A training checkpoint that wraps the state_dict.
  if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
    raise ConfigError(f'teacher file {path!r}: expected a state_dict (names to tensors), '
                      f'found {type(loaded).__name__}')
  return {k: v.detach().cpu().numpy() for k, v in loaded.items()}


# ----------------------------------------------------------------- PyTorch key names

def lenet_names(name: str) -> str:
  return name  # conv1, conv2, conv3, fc1, fc2 in both.


def wide_resnet_names(name: str) -> str:
  fixed = {'stem': 'conv1', 'final_bn': 'bn1', 'fc': 'fc'}
  if name in fixed:
    return fixed[name]
  group, block, part = re.fullmatch(r'g(\d+)b(\d+)_(\w+)', name).groups()
  part = {'proj': 'convShortcut'}.get(part, part)
  return f'block{int(group) + 1}.layer.{block}.{part}'


def cifar_resnet_names(name: str) -> str:
  fixed = {'stem': 'conv1', 'stem_bn': 'bn1', 'fc': 'linear'}
  if name in fixed:
    return fixed[name]
  stage, block, part = re.fullmatch(r's(\d+)b(\d+)_(\w+)', name).groups()
  part = {'proj': 'shortcut.0', 'proj_bn': 'shortcut.1'}.get(part, part)
  return f'layer{int(stage) + 1}.{block}.{part}'


def names_for(module) -> Callable[[str], str]:
  """The PyTorch prefix of each Flax submodule of a registry network."""
  for family, names in ((models._LeNet5Family, lenet_names),
                        (models.WideResNet, wide_resnet_names),
                        (models.CifarResNet, cifar_resnet_names)):
    if isinstance(module, family):
      return names
  raise ConfigError(f'{type(module).__name__}: no PyTorch naming known for it; pass '
                    'names=... (Flax module name -> PyTorch prefix) to from_state_dict')


# ------------------------------------------------------------------ the conversion

_LEAF = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
         ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
         ('batch_stats', 'var'): 'running_var'}


def _to_flax(array: np.ndarray, target_shape) -> np.ndarray:
  """A PyTorch tensor in the layout of a Flax leaf of `target_shape`."""
  if len(target_shape) == 4 and array.ndim == 4:  # Conv OIHW -> HWIO.
    return array.transpose(2, 3, 1, 0)
  if len(target_shape) == 2 and array.ndim == 2:  # Linear (out, in) -> (in, out).
    return array.T
  return array


def _flatten_chw_to_hwc(kernel: np.ndarray, channels: int) -> np.ndarray:
  """A Dense kernel (H*W*C, out) whose rows follow PyTorch's CHW flatten, reordered to
  the HWC flatten of NHWC features."""
  hw = kernel.shape[0] // channels
  return kernel.reshape(channels, hw, -1).transpose(1, 0, 2).reshape(kernel.shape)


def from_state_dict(module, state: Dict[str, np.ndarray], image_shape,
                    names: Optional[Callable[[str], str]] = None, what: str = 'the state_dict'):
  """Flax variables of `module` (for NHWC images of `image_shape`) from a PyTorch
  state_dict; every key of `state` must be used, `num_batches_tracked` aside."""
  names = names or names_for(module)
  template = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                jnp.zeros((1, *image_shape), jnp.float32)))
  flat = traverse_util.flatten_dict(dict(template))
  used, out = set(), {}
  modules_in_order = list(dict.fromkeys(path[1:-1] for path in flat))
  rank = {'kernel': 0, 'scale': 0, 'bias': 1, 'mean': 2, 'var': 3}  # Weights first.
  for path, leaf in sorted(flat.items(), key=lambda item: (
      modules_in_order.index(item[0][1:-1]), rank.get(item[0][-1], 4))):
    collection, *modules, leaf_name = path
    if (collection, leaf_name) not in _LEAF:
      raise ConfigError(f'{type(module).__name__}: no PyTorch counterpart for variable '
                        f'{"/".join(path)}')
    key = f'{names("/".join(modules))}.{_LEAF[collection, leaf_name]}'
    if key not in state:
      raise ConfigError(f'{what}: missing key {key!r} (needed for {"/".join(path)} of '
                        f'{type(module).__name__}, shape {_torch_shape(leaf.shape)})')
    array = _to_flax(np.asarray(state[key], np.float32), leaf.shape)
    if array.shape != tuple(leaf.shape):
      raise _shape_error(what, key, state[key].shape, leaf.shape, modules, module)
    out[path] = array
    used.add(key)
  _reorder_flattened_inputs(module, out, image_shape)
  unused = sorted(k for k in state if k not in used and not k.endswith('.num_batches_tracked'))
  if unused:
    more = f' and {len(unused) - 1} more' if len(unused) > 1 else ''
    raise ConfigError(f'{what}: unexpected key {unused[0]!r}{more} for '
                      f'{type(module).__name__} (another architecture?)')
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out))


def _torch_shape(flax_shape) -> tuple:
  shape = tuple(flax_shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


def _shape_error(what, key, got, expected, modules, module):
  expected = _torch_shape(expected)
  last_layer = modules == ['fc'] or modules == ['fc2']
  if last_layer and len(got) == len(expected) and got[1:] == expected[1:]:
    return ConfigError(f'{what}: {key!r} has shape {tuple(got)}, a teacher of {got[0]} '
                       f'classes; the run has {expected[0]} (set the dataset, or '
                       f'config.num_classes, to match the teacher)')
  return ConfigError(f'{what}: {key!r} has shape {tuple(got)}, expected {expected} for '
                     f'{type(module).__name__} (another architecture or width?)')


def _reorder_flattened_inputs(module, out, image_shape):
  """LeNet's fc1 reads the flattened conv3 output: CHW order in PyTorch, HWC here. With
  1x1 conv3 outputs (32x32 images) the orders agree; larger images need the reorder."""
  if isinstance(module, models._LeNet5Family):
    channels = out['params', 'conv3', 'kernel'].shape[-1]
    out['params', 'fc1', 'kernel'] = _flatten_chw_to_hwc(out['params', 'fc1', 'kernel'],
                                                         channels)


def infer_shape(state: Dict[str, np.ndarray], model: str):
  """(num_classes, input channels) of a registry network's state_dict."""
  module = models.create_classifier(model, 1)
  names = names_for(module)
  first = names('conv1' if isinstance(module, models._LeNet5Family) else 'stem') + '.weight'
  last = names('fc2' if isinstance(module, models._LeNet5Family) else 'fc') + '.weight'
  for key in (first, last):
    if key not in state:
      raise ConfigError(f'the state_dict has no key {key!r}: not a {model} state_dict')
  return int(state[last].shape[0]), int(state[first].shape[1])


def fingerprint(variables) -> str:
  """A short hash of a teacher's variables (report.json records it; a resumed run checks
  that its teacher is the same one)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(jax.device_get(dict(variables))).items()):
    digest.update('/'.join(path).encode())
    digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
  return digest.hexdigest()[:16]


def check_contract(module, variables, image_shape, num_classes: int, what: str) -> None:
  """A ConfigError unless `module.apply(variables, images, train=False)` returns
  (logits (N, num_classes), features (N, F))."""
  images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  try:
    out = jax.eval_shape(lambda x: module.apply(variables, x, train=False), images)
  except Exception as e:  # A user's module can fail in any way; say where, in one line.
    raise ConfigError(f'{what}: apply(variables, images {images.shape}, train=False) '
                      f'failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})') from None
  ok = (isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, num_classes)
        and out[1].ndim == 2 and out[1].shape[0] == 2)
  if not ok:
    got = jax.tree.map(lambda x: tuple(x.shape), out)
    raise ConfigError(f'{what}: apply(variables, images, train=False) returned shapes {got}; '
                      f'expected (logits (N, {num_classes}), features (N, F))')


def restore_teacher(config, model, channels: int):
  """The variables at `config.teacher.checkpoint`: a `teacher_variables` directory, or a
  PyTorch state_dict file (`.safetensors`, `.pt`, `.pth`; see `rdskd_jax.teacher`)."""
  path = os.path.abspath(config.teacher.checkpoint)
  image_shape = (config.image_size, config.image_size, channels)
  if is_state_dict_file(path):
    return from_state_dict(model, read_state_dict(path), image_shape,
                           what=f'config.teacher.checkpoint={path!r}')
  if not os.path.isdir(path):
    raise ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: no such checkpoint '
        'directory (expected the teacher_variables directory of an earlier run, or a '
        'PyTorch state_dict: .safetensors, .pt, .pth)')
  template = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)))
  try:
    restored = ocp.StandardCheckpointer().restore(
        path, jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  except Exception as e:  # Orbax raises several types for unreadable checkpoints.
    raise ConfigError(
        f'config.teacher.checkpoint={config.teacher.checkpoint!r}: not a readable '
        f'{config.teacher.model} checkpoint ({type(e).__name__})') from None
  return jax.tree.unflatten(jax.tree.structure(template), jax.tree.leaves(restored))



# ------------------------------------------------------------------- command line

def _convert(args) -> int:
  state = read_state_dict(args.input)
  num_classes, channels = infer_shape(state, args.model)
  module = models.create_classifier(args.model, num_classes)
  shape = (args.image_size, args.image_size, channels)
  variables = from_state_dict(module, state, shape, what=args.input)
  if os.path.exists(args.out):
    raise ConfigError(f'--out={args.out!r} exists; expected a new directory')
  workdir_lib.save_variables(args.out, variables)
  print(f'{args.input}: {args.model}, {num_classes} classes, {channels} channels, '
        f'{len(state)} tensors -> {args.out} (fingerprint {fingerprint(variables)})')
  if args.dataset:
    import ml_collections
    from rdskd_jax import data, evaluation
    config = ml_collections.ConfigDict({
        'dataset': args.dataset, 'data_dir': args.data_dir, 'image_size': args.image_size,
        'mean': tuple(float(v) for v in args.mean.split(',')),
        'std': tuple(float(v) for v in args.std.split(','))})
    images, labels = data.load_split(config, 'test')
    accuracy = evaluation.evaluate(module, variables, images, labels, 1000)
    print(f'test accuracy on {args.dataset}: {accuracy:.4f} ({len(labels)} images)')
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rdskd_jax.teacher',
      description='PyTorch teachers for rdskd_jax (see the module docstring).')
  commands = parser.add_subparsers(dest='command', required=True)
  convert = commands.add_parser('convert', help='a PyTorch state_dict -> teacher_variables')
  convert.add_argument('input', help='state_dict file: .safetensors, or .pt/.pth (needs torch)')
  convert.add_argument('--model', required=True,
                       help='registry name: ' + ', '.join(models.known_classifiers()))
  convert.add_argument('--out', required=True, help='new directory for the teacher_variables')
  convert.add_argument('--image_size', type=int, default=32)
  convert.add_argument('--dataset', default='', help='tfds name: report test accuracy')
  convert.add_argument('--data_dir', default='')
  convert.add_argument('--mean', default='0.1307', help="per-channel, comma separated")
  convert.add_argument('--std', default='0.3081', help="the teacher's training normalisation")
  args = parser.parse_args(argv)
  if args.model not in models.known_classifiers():
    parser.error(f'--model={args.model!r}: expected one of {", ".join(models.known_classifiers())}')
  return run_reporting_errors(lambda: _convert(args), verbose=False)


if __name__ == '__main__':
  sys.exit(main())
