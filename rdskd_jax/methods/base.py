"""What a method's module is given and gives back: the run's `Context` (its networks, the
frozen teacher, and the pipeline's services: running a stage, reporting) and the
`Outcome` of its training, from which `train.py` reports on the student.

A method module defines:
  STAGES                  the stages it checkpoints after the teacher's (report sections
                          with their training seconds), in order;
  BATCHNORM_PRIOR_FIELDS  its fields that weight a BatchNorm prior (need a BatchNorm teacher);
  check(config, num_devices)  its block's values, checked in every run, and what it needs
                          when it runs (ConfigError, one line);
  train(ctx) -> Outcome   its stages, resuming from the workdir's checkpoints;
  restore(loader) -> (generator variables, student variables, images)  for runs.load_run;
  cost(config) -> {'generator_samples', 'student_samples', ...}  for sweeps;
and, where a sweep may batch its runs with vmap, LEARNING_RATES and train_group(group);
and, where its metrics are not the KD loss and the generator losses plot.py knows, CURVES
({'generator': metric names, 'student': (metric name, title)}) for curves.png.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional


class Context(NamedTuple):
  """A run as a method's `train` sees it, after the teacher."""
  config: Any
  workdir: str
  report: Any               # train.Report: add(section, entries), total_seconds(section, s).
  teacher: Any              # The networks (Flax modules).
  generator: Any
  student: Any
  teacher_vars: Any         # The frozen teacher's variables.
  teacher_fingerprint: str
  channels: int
  num_classes: int
  # stage(name, state, frozen, step_fn, total, report_fn, report_every, derived=None)
  # -> (state, loop seconds of this call): runner.run_stage with the run's workdir, devices,
  # log and the stage's key.
  stage: Callable[..., Any]
  watch_generator: Callable[[Any], Dict[str, float]]    # A generator state -> coverage.
  student_accuracy: Callable[[Any], Dict[str, float]]   # A student state -> test accuracy.
  diagnose_generator: Callable[[Any, int], None]        # (variables, step): diagnostics, once.
  diagnose_images: Callable[[Any, int], None]           # (images, step): diagnostics, once.


class Outcome(NamedTuple):
  """What a method's training leaves for the pipeline's report on the student."""
  student_vars: Any
  student_steps: int        # KD (or student) steps, the report's `student.steps`.
  student_seconds: float    # The stage's training seconds over every call of the run.
  seconds: float            # This call's seconds in the stages' loops.
  generator_vars: Any = None  # The trained generator; None for a method without one,
  images: Any = None          # which gives the synthesised set instead.
  student_entries: Optional[Dict[str, Any]] = None  # Further report.json entries.


class Loader(NamedTuple):
  """A workdir's run as `runs.load_run` restores it, for a method's `restore`."""
  workdir: str
  config: Any
  channels: int
  num_classes: int
  teacher: Any
  generator: Any
  student: Any
  teacher_vars: Any
  # latest(stage, template): the stage's latest checkpoint restored like `template`, or None.
  latest: Callable[[str, Any], Any]


class Group(NamedTuple):
  """A vmapped group of a sweep's runs, for a method's `train_group`."""
  configs: Any              # The runs' configs.
  unit_configs: Any         # The same with every learning rate 1 (the states scale them).
  teacher: Any
  generator: Any
  student: Any
  channels: int
  num_classes: int
  # stage(name, states, frozen, frozen_axes, step_fn, total, derived=None) -> (stacked
  # state, seconds): the runner over the group's stacked states.
  stage: Callable[..., Any]
