"""Does bfloat16 training match float32? The `tiny` preset for 300 steps in each dtype.

  python -m benchmarks.bf16_loss_curves [--workdir=runs/bf16_vs_f32] [--steps=300]

Same config, seed and data order; only `model.compute_dtype` differs (bf16 operands with
float32 accumulation on the dots; params, optimiser state, norms, softmax and loss in
float32). Prints the training loss of both at every logged step, the largest relative
gap over the run and over its last third (where curves, not init noise, are compared),
the final validation losses, and the wall time of each run. Finished runs are reused.
"""
import json
import pathlib
import time

from absl import flags

from benchmarks import common as bench
from configs import pretrain as pretrain_config
from experiments import common
from experiments import pretrain


def losses(workdir: pathlib.Path) -> dict:
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'train/loss' in row:
      out[row['step']] = row['train/loss']
  return out


def main():
  parser = bench.ArgumentParser()
  parser.add_argument('--workdir', default='runs/bf16_vs_f32')
  parser.add_argument('--steps', type=bench.positive_int, default=300)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  common.check_workdir(args.workdir)
  root = pathlib.Path(args.workdir)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = pretrain_config.get_config('tiny')
    config.model.compute_dtype = dtype
    config.train.steps = args.steps
    config.train.num_samples = 0
    start = time.time()
    summary = pretrain.train(config, root / dtype)
    results[dtype] = dict(summary=summary, seconds=time.time() - start,
                          losses=losses(root / dtype))
  f32, bf16 = results['float32']['losses'], results['bfloat16']['losses']
  steps = sorted(set(f32) & set(bf16))
  gaps = {s: abs(bf16[s] - f32[s]) / f32[s] for s in steps}
  print('step  float32  bfloat16  relative gap')
  for s in steps:
    print(f'{s:5d}  {f32[s]:.4f}   {bf16[s]:.4f}    {gaps[s]:.4f}')
  late = [gaps[s] for s in steps if s >= steps[-1] * 2 // 3]
  for dtype, r in results.items():
    print(f'{dtype}: final validation loss {r["summary"]["validation"]["causal_loss"]:.4f}, '
          f'{r["seconds"]:.0f} s in this call (a finished run is only re-evaluated)')
  print(f'largest relative gap in training loss over {len(steps)} logged steps: '
        f'{max(gaps.values()):.4f}; over the last third: {max(late):.4f}')
  v32 = results['float32']['summary']['validation']['causal_loss']
  v16 = results['bfloat16']['summary']['validation']['causal_loss']
  print(f'relative gap in final validation loss: {abs(v16 - v32) / v32:.4f}')


if __name__ == '__main__':
  common.exit_on_user_error(main)()
