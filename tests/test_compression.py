"""Masked-LM and distillation objectives against NumPy statements of their formulas; the
distillation teacher, of another size, sharded like the student; the experiments' commands."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.config import ConfigError
from lm.data import tokenizers
from lm.objectives import pretrain
from lm.training import runs, steps
from tests.conftest import build_program, random_batch, tiny_config
from tests.test_post import _apply, _log_softmax, _model, _params
from tests.test_train import read_metrics, run_main


def test_mlm_corruption_chooses_15_percent_and_leaves_the_rest_alone():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (256, 1024), 0, 100)
  corrupted, chosen = pretrain.mlm_corruption(tokens, jax.random.PRNGKey(1), 0.15, 100, 100)
  tokens, corrupted, chosen = map(np.asarray, (tokens, corrupted, chosen))
  assert abs(chosen.mean() - 0.15) < 0.005
  assert np.array_equal(corrupted[~chosen], tokens[~chosen])   # unchosen: untouched
  masked = corrupted[chosen] == 100
  kept = corrupted[chosen] == tokens[chosen]
  replaced = ~masked & ~kept
  # 80% [MASK]; 10% random (a random token equals the original 1% of the time); 10% kept
  np.testing.assert_allclose([masked.mean(), replaced.mean(), kept.mean()],
                             [0.8, 0.1 * 0.99, 0.1 + 0.1 * 0.01], atol=0.01)


def test_mlm_loss_and_accuracy_count_the_chosen_positions_only():
  model = _model(causal=False, vocab_size=65)   # 64 tokens and [MASK]
  params = _params(model)
  tokens = jnp.asarray(random_batch(4, 16)['inputs'])
  rng = jax.random.PRNGKey(3)
  loss = pretrain.masked_lm(model, 0.15, 64)
  total, count, metrics = jax.jit(lambda p, b: loss(p, {}, b, rng, False))(
      params, {'inputs': tokens, 'targets': tokens})
  corrupted, chosen = pretrain.mlm_corruption(tokens, jax.random.split(rng)[0], 0.15, 64, 64)
  logp = _log_softmax(_apply(model, {'params': params}, corrupted))
  chosen = np.asarray(chosen)
  nll = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
  assert count == chosen.sum() > 0
  np.testing.assert_allclose(total, nll[chosen].sum(), rtol=1e-5)
  hits = (logp.argmax(-1) == np.asarray(tokens))[chosen].sum()
  assert metrics['accuracy'] == hits


def _teacher_run(tmp_path, **model) -> str:
  """A run directory holding a (randomly initialised) teacher, as lm.export writes one."""
  config = config_lib.resolve(tiny_config(**model), None)   # as a run saves it
  program = build_program(config)
  params = _params(program.model, seed=1, scale=2.0)
  tokenizer = tokenizers.CharTokenizer(''.join(chr(65 + i) for i in range(64)))
  runs.write(tmp_path / 'teacher', config, params, tokenizer, step=0)
  return str(tmp_path / 'teacher')


def _distill_config(teacher: str, **overrides):
  config = tiny_config(n_layers=1, d_model=16, n_heads=4, n_kv_heads=4)   # smaller student
  config.train.objective = 'distill'
  config.distill.update(teacher=teacher, **overrides)
  return config


def test_distillation_mixes_cross_entropy_and_softened_kl_as_numpy(tmp_path):
  teacher_dir = _teacher_run(tmp_path)
  program = build_program(_distill_config(teacher_dir, temperature=2.0, kl_weight=0.3))
  student, teacher = _params(program.model), runs.load(teacher_dir, 'teacher')
  batch = random_batch(4, 16)
  total, count, metrics = jax.jit(lambda p, f, b: program.objective(p, f, b, None, False))(
      student, {'teacher': teacher.variables['params']}, batch)
  ls, lt = (_log_softmax(np.asarray(_apply(m, {'params': p}, batch['inputs']), np.float64) / 2)
            for m, p in ((program.model, student), (teacher.model, teacher.variables['params'])))
  kl = (np.exp(lt) * (lt - ls)).sum(-1).sum()
  ce = -np.take_along_axis(_log_softmax(_apply(program.model, {'params': student},
                                                batch['inputs'])),
                           batch['targets'][..., None], -1).sum()
  assert count == batch['targets'].size
  np.testing.assert_allclose([metrics['kl'], metrics['ce']], [kl, ce], rtol=2e-5)
  np.testing.assert_allclose(total, 0.7 * ce + 0.3 * 4.0 * kl, rtol=2e-5)


def test_sharded_distillation_equals_one_device(tmp_path):
  """Teacher (2 layers, d 32) and student (1 layer, d 16) both sharded over fsdp x tensor."""
  teacher_dir = _teacher_run(tmp_path)
  teacher = runs.load(teacher_dir, 'teacher').variables['params']
  batch = random_batch(8, 16)
  results = []
  for shape in ((1, 1, 1, 1), (1, 2, 4, 1)):
    program = build_program(_distill_config(teacher_dir), shape)
    frozen = jax.device_put(teacher, jax.tree.map(lambda a: a.sharding,
                                                  program.abstract_frozen['teacher']))
    fn = program.in_mesh(jax.jit(lambda p, f, b, program=program: steps.loss_and_grads(
        p, {'teacher': f}, b, jax.random.PRNGKey(0), program.objective, 1)[:2]))
    params = program.init(jax.random.PRNGKey(0)).params
    loss, grads = fn(params, frozen, jax.device_put(batch, program.batch_sharding))
    if shape != (1, 1, 1, 1):
      kernel = program.abstract_frozen['teacher']['layers']['mlp']['wi']['kernel']
      assert kernel.sharding.shard_shape(kernel.shape) == (2, 32 // 2, 64 // 4)
    results.append((float(loss), jax.device_get(grads)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_distillation_refuses_a_teacher_of_another_vocabulary(tmp_path):
  teacher_dir = _teacher_run(tmp_path, vocab_size=72)
  with pytest.raises(ConfigError, match='has a vocabulary of 72, the student 64'):
    build_program(_distill_config(teacher_dir))
  with pytest.raises(ConfigError, match='no config.json'):
    build_program(_distill_config(str(tmp_path / 'nowhere')))


def test_student_equal_to_its_teacher_has_zero_loss_at_init_then_mlm_command(char_run, tmp_path,
                                                                             tfds_dir):
  run_main(tmp_path / 'student', '--config.train.steps=20', '--config.train.eval_every=20',
           '--config.train.checkpoint_every=20', '--config.train.eval_batches=2',
           f'--config.data.dir={tfds_dir}', '--config.train.objective=distill',
           f'--config.distill.teacher={char_run}', '--config.distill.kl_weight=1.0',
           f'--config.train.init_from={char_run}', '--config.train.log_every=1',
           '--config.sample.num_tokens=0', config='experiments/shakespeare_char.py:smoke')
  first = read_metrics(tmp_path / 'student')[0]
  assert first['step'] == 1 and abs(first['loss']) < 1e-6 and abs(first['kl']) < 1e-6, first

  run_main(tmp_path / 'mlm', f'--config.data.dir={tfds_dir}',
           config='experiments/mlm_shakespeare.py:smoke')
  metrics = read_metrics(tmp_path / 'mlm')
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert losses[-1] < losses[0] - 0.5, losses
  final = json.loads((tmp_path / 'mlm' / 'final.json').read_text())
  assert 0.2 < final['val_accuracy'] <= 1.0 and 'test_accuracy' in final, final
