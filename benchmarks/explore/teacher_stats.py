"""How confident teachers are on real digits: accuracy, logit spread, top-two margin and
mean top probability on train[50000:55000] (a validation slice; never the test split).

    python -m benchmarks.explore.teacher_stats W1/teacher_variables [W2/teacher_variables ...]
"""
import os, sys
import jax, numpy as np
from rdskd_jax import train, data
from configs import mnist
config = mnist.get_config('cpu')
images, labels = data.load_split(config, 'train')
vx, vy = images[50000:55000], labels[50000:55000]
for path in sys.argv[1:]:
  config.teacher.checkpoint = path
  teacher, _, _ = train.build_networks(config, 10, 1)
  tv = train.restore_teacher(config, teacher, 1)
  logits = np.asarray(teacher.apply(tv, vx, train=False)[0])
  p = jax.nn.softmax(logits); srt = np.sort(logits, -1)
  print(os.path.basename(os.path.dirname(os.path.normpath(path))), 'val acc %.4f' % (logits.argmax(-1) == vy).mean(),
        'logit std %.2f' % logits.std(-1).mean(), 'margin %.2f' % (srt[:, -1] - srt[:, -2]).mean(),
        'mean max p %.4f' % p.max(-1).mean())
