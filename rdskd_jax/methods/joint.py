"""What the methods that train generator and student together in one stage share (DAFL,
DFAD): the stage's state, its run with the reports, its restore and its vmapped sweep.
A method using it defines `setup(config, channels, generator, teacher, student) ->
(state, step_fn)` and names its stage after itself."""

import jax
import jax.numpy as jnp

from rdskd_jax import train_steps
from rdskd_jax.errors import RunStopped
from rdskd_jax.methods import base
from rdskd_jax.stages import init_key


def initial_state(config, channels: int, generator, student, tx_generator, tx_student):
  """The stage's state at step 0: the generator's and the student's train states."""
  gen_vars = train_steps.init_variables(generator, init_key(config, 'generator'),
                                        jnp.zeros((2, config.generator.latent_dim)))
  params, collections = train_steps.classifier_init(
      student, init_key(config, 'student'), (config.image_size, config.image_size, channels))
  return {'step': jnp.int32(0),
          'generator': train_steps.new_train_state(gen_vars['params'], tx_generator,
                                                   batch_stats=gen_vars['batch_stats']),
          'student': train_steps.new_train_state(params, tx_student, **collections),
          'nonfinite': {'total': jnp.int32(0), 'streak': jnp.int32(0)}}


def combined_nonfinite(g_state, s_state):
  """The stage's skipped-step counters from its two networks' own."""
  bad_g, bad_s = g_state['nonfinite'], s_state['nonfinite']
  return {'total': bad_g['total'] + bad_s['total'],
          'streak': jnp.maximum(bad_g['streak'], bad_s['streak'])}


def with_finite_statistics(s_state, updates):
  """The student's state with the BatchNorm statistics `updates` of a forward pass outside
  its own step (the generator's step, in training mode), kept only where all are finite."""
  if not updates:
    return s_state
  old = {k: s_state[k] for k in updates}
  updates = train_steps.same_dtypes(updates, old)
  finite = train_steps.all_finite(updates)
  return dict(s_state, **jax.tree.map(lambda n, o: jnp.where(finite, n, o), updates, old))


def train(ctx: base.Context, name: str, setup, steps: int) -> base.Outcome:
  """Method `name`'s one stage of `steps` steps; the generator's diagnostics after it."""
  config = ctx.config
  state, step_fn = setup(config, ctx.channels, ctx.generator, ctx.teacher, ctx.student)
  state, seconds = ctx.stage(
      name, state, {'teacher': ctx.teacher_vars}, step_fn, steps,
      lambda s: {**ctx.watch_generator(s['generator']), **ctx.student_accuracy(s['student'])},
      config.student.eval_every)
  total = ctx.report.total_seconds(name, seconds)
  ctx.report.add(name, {'steps': steps, 'seconds': total})
  ctx.report.add('generator', {'steps': steps, 'seconds': total, 'trained_with': 'student'})
  gen_vars = train_steps.variables_of(state['generator'])
  ctx.diagnose_generator(gen_vars, steps)
  return base.Outcome(student_vars=train_steps.variables_of(state['student']),
                      student_steps=steps, student_seconds=total, seconds=seconds,
                      generator_vars=gen_vars)


def restore(loader: base.Loader, name: str, setup):
  """(generator variables, student variables, None) of the stage's latest checkpoint."""
  state = loader.latest(name, setup(loader.config, loader.channels, loader.generator,
                                    loader.teacher, loader.student)[0])
  if state is None:
    raise RunStopped(f'{loader.workdir!r} has no generator checkpoint yet')
  return (train_steps.variables_of(state['generator']),
          train_steps.variables_of(state['student']), None)


def train_group(group: base.Group, name: str, setup, steps: int):
  """A sweep's vmapped runs: (stacked generator variables, student variables, seconds)."""
  setups = [setup(u, group.channels, group.generator, group.teacher, group.student)
            for u in group.unit_configs]
  state, seconds = group.stage(name, [s for s, _ in setups], setups[0][1], steps)
  return (train_steps.variables_of(state['generator']),
          train_steps.variables_of(state['student']), {name: seconds})
