"""The whole pipeline's config: `--config=configs/pipeline.py[:PRESET]`.

One section per stage, each the stage's own config (configs/pretrain.py, sft.py,
rlhf.py, whose `reward_model` section is the proxy reward model's, dpo.py, and
limitations.py inside `evaluate`), so any stage field can be overridden:
`--config.pretrain.train.steps=600`, `--config.rlhf.ppo.iterations=8`.

The SFT stage trains on configs/sft.py's `tools` mix: chat, plain word problems, the
same problems with every step handed to the calculator, and GSM8K with calculator calls
when ../shared/data is present; the tool conversations open with a system message that
declares the calculator (`data.tools_in_system`), so a prompt without it asks the model
to work the steps out itself. `rl_method` picks the RL stage:
  ppo      (default) PPO with GAE against the proxy reward model (configs/rlhf.py)
  grpo, rloo, dr_grpo   the same stage with that advantage estimator (groups of 4, no
           value model; research/ppo.py ESTIMATORS)
  dpo      DPO (experiments/dpo.py) on the gold-labelled pairs of the SFT policy's samples
           that the reward model would be trained on (no reward model, no sampling in
           the loop)
The `evaluate` stage runs the harness tasks (`evaluate.tasks`, lm-eval over evals/tasks;
skipped, and said so in the report, when ../shared/data is absent), held-out one- and
two-step word problems with the calculator live and without, for the pretrained, SFT
and RL models, and the limitation metrics (experiments/limitations.py) at a small size.

Presets:
  tiny   the README's main command: the `tiny` model (4.2M parameters) through every
         stage on the embedded corpus, sized for about 15 minutes on 2 CPU cores; each
         stage also has a time cap (train.max_minutes) that stops it early on a slow
         machine (a capped stage counts as finished, and its step count is then the one
         place a rerun can differ)
  small  the `small` model (13.8M), longer stages: an hour or more on 2 CPU cores
  gpu    the `gpu` model on one accelerator
  pod    the `gpu` preset over every device of every host (jax.distributed): only the
         meshes differ, data-parallel over all devices (`mesh.shape=(-1, 1, 1)`) for
         pretraining, SFT, the reward model and RL or DPO. Launch one process per host
         with the coordinator in the environment, e.g. on a laptop, 2 processes × 4 CPU
         devices:
           python -m experiments.launch --processes=2 --devices_per_process=4 -- \
               python -m experiments.pipeline --config=configs/pipeline.py:pod
         on a TPU slice `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=
         "python -m experiments.pipeline --config=configs/pipeline.py:pod"`, on SLURM
         `srun`; `common.maybe_initialize_distributed` calls `jax.distributed.initialize`.
         The PPO batch must split over all devices (64 = 2 minibatches of 32 fits 32).
         After RL every process leaves jax.distributed and process 0 evaluates as a
         one-process run of the same command (experiments/pipeline.py `main`).
  test   seconds per stage, for tests
Every preset prints a progress line with ETA per loop and, at each stage, the overall
ETA from `budget_minutes` (the stages' expected minutes, rescaled by how the finished
stages of this run compared with theirs).
"""
import ml_collections

from configs import dpo as dpo_config
from configs import limitations as limitations_config
from configs import pretrain as pretrain_config
from configs import rlhf as rlhf_config
from configs import sft as sft_config

RL_METHODS = ('ppo', 'grpo', 'rloo', 'dr_grpo', 'dpo')

# Stage sizes. budget: expected minutes per stage on 2 quiet CPU cores (tiny; measured),
# for the overall ETA; the *_minutes caps stop a stage early on a slower machine.
PRESETS = {
    'tiny': dict(pretrain='tiny', pretrain_steps=300, pretrain_minutes=6.0, sft_steps=150,
                 sft_minutes=3.0, sft_train=2400, max_k=2, rl_iterations=8, rl_batch=32,
                 rl_prompts=256, rm_steps=60, rl_eval_prompts=64, rl_minutes=3.0,
                 eval_per_k=50, harness_limit=100, lim='small',
                 budget=dict(pretrain=5.5, sft=2.8, rlhf=1.8, evaluate=3.5)),
    'small': dict(pretrain='small', pretrain_steps=3000, pretrain_minutes=0.0, sft_steps=400,
                  sft_minutes=0.0, sft_train=4000, max_k=4, rl_iterations=48, rl_batch=64,
                  rl_prompts=2400, rm_steps=200, rl_eval_prompts=128, rl_minutes=0.0,
                  eval_per_k=100, harness_limit=500, lim='default',
                  budget=dict(pretrain=60, sft=15, rlhf=25, evaluate=20)),
    'gpu': dict(pretrain='gpu', pretrain_steps=20000, pretrain_minutes=0.0, sft_steps=2000,
                sft_minutes=0.0, sft_train=20000, max_k=4, rl_iterations=200, rl_batch=64,
                rl_prompts=4800, rm_steps=1000, rl_eval_prompts=256, rl_minutes=0.0,
                eval_per_k=200, harness_limit=0, lim='default',
                budget=dict(pretrain=120, sft=15, rlhf=30, evaluate=20)),
    'test': dict(pretrain='tiny', pretrain_steps=6, pretrain_minutes=0.0, sft_steps=6,
                 sft_minutes=0.0, sft_train=60, max_k=2, rl_iterations=2, rl_batch=8,
                 rl_prompts=160, rm_steps=4, rl_eval_prompts=8, rl_minutes=0.0,
                 eval_per_k=3, harness_limit=4, lim='test',
                 budget=dict(pretrain=0.2, sft=0.2, rlhf=0.3, evaluate=0.5)),
}
PRESETS['pod'] = PRESETS['gpu']

# The limitation metrics at a small size: the limitations study's default, shortened.
# The think part is left out: both of its arms train from scratch, and at the 200 steps
# that fit here they scored 0.00-0.05 at every k (3 layers, d=128; 72 s), a table with
# nothing in it. The study's default size measures it (experiments/limitations.py).
SMALL_LIMITATIONS = dict(parts='hallucination,search,bias,tokenizer', people=60, repeats=4,
                         steps=200, finetune_steps=60, bias_texts=400, bias_probes=24,
                         tokenizer_steps=400)


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  preset = arg or 'tiny'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.from_stage = ''  # rerun from this stage on (earlier results are kept aside, not deleted)
  c.rl_method = 'ppo'  # one of RL_METHODS
  c.budget_minutes = ml_collections.ConfigDict(p['budget'])

  c.pretrain = pretrain_config.get_config(p['pretrain'])
  c.pretrain.train.steps = p['pretrain_steps']
  c.pretrain.train.max_minutes = p['pretrain_minutes']

  # SFT: the tool mix. Its own evaluation stays small (no live tools): the evaluation
  # stage measures with and without tools on every model.
  c.sft = sft_config.get_config('tools' if preset != 'test' else 'test')
  s = c.sft
  # The same problems plain and with calculator calls; the calculator conversations (and
  # GSM8K's) open with a system message declaring the tool, so the evaluation can ask
  # for either. Search questions are left to configs/sft.py:tools.
  for name, weight in dict(chatterbot=0.5, word_problems=1.0, gsm8k=0.0, calculator=1.5,
                           gsm8k_tools=0.5, search=0.0).items():
    s.data.weights[name] = weight
  s.data.tools_in_system = True
  s.train.steps = p['sft_steps']
  s.train.max_minutes = p['sft_minutes']
  s.data.num_train = p['sft_train']
  s.data.word_problems.max_steps = p['max_k']
  s.data.seq_len = min(s.data.seq_len, c.pretrain.data.seq_len)
  s.eval.tools = False
  s.eval.gsm8k = 0
  s.eval.word_problems_per_k = min(s.eval.word_problems_per_k, 20)
  s.eval.chat_prompts = ('Hello, how are you?',
                         'Sam has 5 pens. He buys 3 more. How many pens does Sam have?')

  c.rlhf = rlhf_config.get_config('test' if preset == 'test' else 'default')
  r = c.rlhf
  r.ppo.iterations = p['rl_iterations']
  r.ppo.batch_size = p['rl_batch']
  r.pairs.num_prompts = p['rl_prompts']
  r.reward_model.train.steps = p['rm_steps']
  r.reward_model.optimizer.warmup_steps = max(1, p['rm_steps'] // 10)
  r.data.eval_prompts = p['rl_eval_prompts']
  r.eval.every = max(1, p['rl_iterations'] // 4)
  r.checkpoint_every = max(1, p['rl_iterations'] // 4)
  r.max_minutes = p['rl_minutes']
  # DPO (rl_method='dpo'): its loss and schedule; the pairs are the reward model's.
  c.dpo = dpo_config.get_config('test' if preset == 'test' else 'jsonl')
  c.dpo.train.steps = max(p['rm_steps'], 2)
  c.dpo.optimizer.learning_rate = 1e-4
  c.dpo.optimizer.warmup_steps = max(1, p['rm_steps'] // 10)
  c.dpo.train.checkpoint_every = max(1, c.dpo.train.steps // 2)
  c.dpo.train.max_minutes = p['rl_minutes']
  c.dpo.data.seq_len = r.reward_model.data.seq_len

  c.evaluate = ml_collections.ConfigDict()
  e = c.evaluate
  # lm-eval tasks (evals/tasks, data in ../shared/data); skipped when that data is absent.
  e.tasks = ('piqa_local', 'openbookqa_local')
  e.harness_limit = p['harness_limit']  # items per task (0: all)
  e.harness_batch_size = 16
  e.word_problems_per_k = p['eval_per_k']  # held-out problems per k (the SFT stage's test set)
  e.ks = (1, 2)
  e.max_new_tokens = 64  # without tools
  e.tools_max_new_tokens = 160  # with tools (injected results not counted; a call is ~30)
  e.batch_size = 50
  e.sample_conversations = 3  # with the calculator live, in the report
  e.limitations = limitations_config.get_config('test' if p['lim'] == 'test' else 'default')
  if p['lim'] == 'small':
    lc, sl = e.limitations, SMALL_LIMITATIONS
    lc.hallucination.people, lc.hallucination.repeats = sl['people'], sl['repeats']
    lc.hallucination.steps = sl['steps']
    lc.hallucination.finetune_steps = sl['finetune_steps']
    lc.bias.texts, lc.bias.probes = sl['bias_texts'], sl['bias_probes']
    lc.parts, lc.tokenizer_view.steps = sl['parts'], sl['tokenizer_steps']

  if preset == 'pod':  # data-parallel over every device of every process
    for stage in (c.pretrain, c.sft, c.rlhf, c.dpo):
      stage.mesh.shape = (-1, 1, 1)
  if preset == 'test':
    # The tiny test model's corpus is small: prompts from short sentences.
    r.data.min_sentence_words, r.data.min_words, r.data.max_words = 6, 2, 4
    c.pretrain.data.seq_len = 128
    c.pretrain.data.batch_size = 8
    c.pretrain.tokenizer.vocab_size = 512
    c.pretrain.model.d_model = 32
    c.pretrain.model.num_layers = 1
    c.pretrain.model.num_heads = 2
    c.pretrain.train.eval_every = 0
    c.pretrain.train.eval_batches = 1
    c.pretrain.train.num_samples = 1
    c.pretrain.train.sample_tokens = 4
    s.data.seq_len = 128
    s.data.search_questions = 20
    s.eval.max_new_tokens = 8
    e.max_new_tokens = e.tools_max_new_tokens = 8
    e.sample_conversations = 1
    e.tasks = ('piqa_local',)
    e.limitations.parts = 'bias'  # one small model (the other parts train three more)
  return c
