"""Train state, optimiser and the jitted, sharded train step.

`make_train_state` builds the state directly in its shardings (jit with
out_shardings, so no replicated copy is ever made), `make_train_step` returns a pure
`(state, batch, rng) -> (state, metrics)` and `jit_train_step` compiles it over the
mesh with the state donated. Gradient accumulation splits the batch into
microbatches inside the step (a `lax.scan`), so one call is one optimiser update
whatever the accumulation.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research import kernels
from research import model as model_lib
from research import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip: float = 1.0


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Learning rate (float32 scalar) of step t = 0, 1, ...: linear warmup, then cosine.

  With peak = learning_rate, W = min(warmup_steps, total_steps), T = total_steps and
  end = final_lr_fraction * peak (nanoGPT's `get_lr`, Karpathy 2022; cosine decay as
  Loshchilov & Hutter 2017):
    t < W:       peak * (t + 1) / W          (step 0 already learns; step W - 1 is at peak)
    W <= t < T:  end + (peak - end) * (1 + cos(pi * (t - W) / (T - W))) / 2
    t >= T:      end
  warmup_steps=0 is the full rate from step 0. Never 0 during the run: a warmup that
  starts at 0 wastes the first update (its AdamW moments are still accumulated).
  """
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction
  warmup = max(0, min(cfg.warmup_steps, cfg.total_steps))
  decay = max(cfg.total_steps - warmup, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    cosine = end + 0.5 * (peak - end) * (1 + jnp.cos(jnp.pi * jnp.clip((t - warmup) / decay,
                                                                         0.0, 1.0)))
    cosine = jnp.where(t >= cfg.total_steps, end, cosine)
    return jnp.where(t < warmup, peak * (t + 1) / max(warmup, 1), cosine)
  return schedule


def decay_mask(params):
  """Weight decay on matrices and embeddings, never on norm scales or biases."""
  def decays(path, _):
    names = {getattr(k, 'key', getattr(k, 'name', None)) for k in path}
    return not names & {'scale', 'bias'}
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def dummy_inputs(batch_size: int, seq_len: int):
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return z, z, z, jnp.zeros((batch_size, seq_len), bool)


def abstract_train_state(model: model_lib.Transformer, tx, batch_size: int, seq_len: int):
  """(boxed abstract state, init fn). The boxes carry each leaf's logical axis names."""
  def init(rng):
    params = model.init(rng, *dummy_inputs(batch_size, seq_len))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.eval_shape(init, jax.random.key(0)), init


def state_shardings(model, tx, mesh, batch_size: int, seq_len: int, check=True):
  """Shardings of the (unboxed) train state, from the logical rules."""
  abstract, _ = abstract_train_state(model, tx, 1, seq_len)
  logical = nn.get_partition_spec(abstract)
  if check:
    tensor = mesh.shape['tensor']
    for name, heads in (('num_heads', model.cfg.num_heads), ('kv_heads', model.cfg.kv_heads)):
      if heads % tensor:
        raise sharding.MeshError(f'model {name}={heads} is not divisible by the mesh tensor '
                                 f'axis {tensor}')
    sharding.check_divisible(mesh, batch_size, nn.unbox(abstract.params), logical.params)
  return sharding.logical_to_sharding(logical, mesh)


def make_train_state(model, tx, mesh, rng, batch_size: int, seq_len: int) -> TrainState:
  """Initialise params and optimiser state directly in their shardings."""
  shardings = state_shardings(model, tx, mesh, batch_size, seq_len)
  _, init = abstract_train_state(model, tx, 1, seq_len)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def init_rng(seed: int) -> jax.Array:
  """The key a run's random initialisation draws from (the training key is key(seed)
  itself; the fold keeps the two streams apart)."""
  return jax.random.fold_in(jax.random.key(seed), 1 << 20)


def init_params(model_cfg: model_lib.TransformerConfig, seed: int, seq_len: int):
  """The params a fresh pretraining run of this seed starts from (unsharded, unboxed)."""
  model = model_lib.Transformer(model_cfg)
  return nn.unbox(model.init(init_rng(seed), *dummy_inputs(1, seq_len))['params'])


def train_state_from_params(params, tx, shardings, mesh) -> TrainState:
  """A step-0 state around given params (a previous stage's), in the state's shardings."""
  params = sharding.place(params, shardings.params)  # from every process's whole copy
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = sharding.place(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)


def loss_sums(params, model, example, z_loss: float):
  """Summed loss (cross-entropy + z-loss: what is differentiated), z-loss, correct
  predictions and scored tokens of one prepared example.

  `kernels.lm_head_loss` returns the cross-entropy and the z term apart; callers get the
  cross-entropy alone as loss_sum − z_loss_sum.
  """
  cfg = model.cfg
  hidden_BxLxD, _ = model.apply({'params': params}, example['inputs'], example['positions'],
                                example['segment_ids'], example['prefix'])
  b, l, d = hidden_BxLxD.shape
  loss, z, correct = kernels.lm_head_loss(
      hidden_BxLxD.reshape(b * l, d), model_lib.head_weights(params),
      example['targets'].reshape(b * l), example['weights'].reshape(b * l),
      z_loss=z_loss, compute_dtype=cfg.compute_dtype)
  return loss + z, dict(loss_sum=loss + z, z_loss_sum=z, correct=correct,
                        tokens=jnp.sum(example['weights']))


def make_train_step(model, tx, schedule, objective: Callable, ids, *, z_loss=0.0,
                    grad_accum_steps=1):
  """Pure train step. `objective(batch, rng, ids)` prepares inputs/targets on device."""

  def grads_of(params, batch, rng):
    example = objective(batch, rng, ids)
    (_, sums), grads = jax.value_and_grad(loss_sums, has_aux=True)(params, model, example,
                                                                  z_loss)
    return grads, sums

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      grads, sums = grads_of(state.params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)
      def accumulate(carry, xs):
        mb, i = xs
        g, s = grads_of(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.tree.map(jnp.zeros_like,
                           jax.eval_shape(grads_of, state.params,
                                          jax.tree.map(lambda x: x[0], micro), rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                      (micro, jnp.arange(grad_accum_steps)))
    n = jnp.maximum(sums['tokens'], 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)  # gradient of the mean over scored tokens
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=(sums['loss_sum'] - sums['z_loss_sum']) / n,
                   z_loss=sums['z_loss_sum'] / n, accuracy=sums['correct'] / n,
                   grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                   loss_tokens=sums['tokens'])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def jit_train_step(step: Callable, shardings, mesh, batch_size: int = 0):
  """Compile over the mesh: state donated, batch split over data×fsdp, metrics replicated.
  Each process passes its own rows of the batch; `batch_size` > 0: the global batch
  must have that many rows (sharding.MeshError otherwise)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def with_rules(state, batch, rng):
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return step(state, batch, rng)

  jitted = jax.jit(with_rules, in_shardings=(shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  @functools.wraps(step)
  def run(state, batch, rng):
    batch = sharding.global_batch(batch, mesh, batch_size)  # each process: its own rows
    with jax.set_mesh(mesh):
      return jitted(state, batch, rng)
  run.jitted = jitted
  return run
