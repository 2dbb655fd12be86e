"""Pictures of a run: the generated-sample grid labelled with the teacher's classes."""

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402


def save_samples(path, generator, generator_vars, teacher, teacher_vars, latent_dim, config,
                 key, num_samples: int = 512, per_class: int = 8) -> None:
  """A grid with one row per class: generated images the teacher assigns to that class.

  Images come from the trained generator in inference mode; rows with fewer than
  `per_class` samples (a class the generator rarely produces) stay partly empty, which is
  itself a diagnostic.
  """
  z = jax.random.normal(key, (num_samples, latent_dim))
  images = generator.apply(generator_vars, z, train=False)
  logits, _ = teacher.apply(teacher_vars, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits))
  predicted = probs.argmax(-1)
  std, mean = np.asarray(config.std), np.asarray(config.mean)
  pictures = np.clip(np.asarray(images) * std + mean, 0.0, 1.0)
  num_classes = probs.shape[-1]
  fig, axes = plt.subplots(num_classes, per_class, figsize=(per_class * 0.9, num_classes * 0.9))
  for c in range(num_classes):
    members = np.flatnonzero(predicted == c)
    members = members[np.argsort(-probs[members, c])][:per_class]
    for j in range(per_class):
      ax = axes[c, j]
      ax.set_xticks([])
      ax.set_yticks([])
      if j < len(members):
        picture = pictures[members[j]]
        ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap='gray',
                  vmin=0, vmax=1)
      if j == 0:
        ax.set_ylabel(f'{c} ({np.mean(predicted == c):.0%})', fontsize=7)
  fig.suptitle('generated samples by teacher class (share of samples)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
