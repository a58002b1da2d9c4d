"""The Hugging Face bridge against the real transformers library: logits, greedy
generation, tokenizer, chat template, the export -> import round trip, refusals."""
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from research import chat  # pylint: disable=g-import-not-at-top
from research import checkpoint as checkpoint_lib
from research import hf
from research import model as model_lib
from research import reward_model
from research import sampling
from tests.test_pretrain import write_corpus

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA_SHAPED = {  # GQA, SwiGLU, untied: the Llama features the presets do not use
    'model.mlp': 'swiglu', 'model.num_heads': 4, 'model.num_kv_heads': 2,
    'model.tie_embeddings': False, 'model.d_model': 32, 'model.num_layers': 2,
}
CONVERSATION = [
    {'role': 'system', 'content': 'Answer briefly.'},
    {'role': 'user', 'content': 'What is 12 + 30? Café, 日本語 🎉\n\tindented  twice'},
    {'role': 'assistant', 'content': 'Let me compute.',
     'tool_calls': [{'name': 'calc', 'arguments': {'op': '+', 'b': 30, 'a': [12, 'é']}},
                    {'name': 'log', 'arguments': {}}]},
    {'role': 'tool', 'content': '42'},
    {'role': 'assistant', 'content': 'It is 42.'},
    {'role': 'user', 'content': 'Thanks!'},
]


def run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A finished, Llama-shaped pretraining run (30 steps: peaked enough for greedy tests)."""
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from experiments import common, pretrain  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('hf')
  config = pretrain_config.get_config('tiny')
  for name, value in {
      'data.corpus': write_corpus(root / 'corpus'), 'data.seq_len': 32, 'data.batch_size': 8,
      'tokenizer.vocab_size': 512, 'train.steps': 30, 'train.eval_every': 0,
      'train.eval_batches': 1, 'train.checkpoint_every': 100, 'train.num_samples': 0,
      'optimizer.warmup_steps': 1, 'optimizer.learning_rate': 1e-2, **LLAMA_SHAPED}.items():
    common.apply_override(config, name, str(value))
  pretrain.train(config, root / 'pretrain')
  return root / 'pretrain'


@pytest.fixture(scope='module')
def exported(pretrained):
  out = pretrained.parent / 'hf_out'
  result = run('experiments.export_hf', f'--workdir={pretrained}', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  return out


@pytest.fixture(scope='module')
def ours(pretrained):
  params, config, tokenizer = checkpoint_lib.load_stage(pretrained)
  return params, model_lib.TransformerConfig.from_dict(config['model']), tokenizer


def our_logits(params, cfg, ids_BxL):
  b, l = ids_BxL.shape
  hidden, _ = model_lib.Transformer(cfg).apply(
      {'params': params}, jnp.asarray(ids_BxL), jnp.tile(jnp.arange(l), (b, 1)),
      jnp.ones((b, l), jnp.int32), jnp.zeros((b, l), bool))
  return np.asarray(model_lib.logits(params, hidden))


def hf_logits(model_dir, ids_BxL, cls=None):
  model = (cls or transformers.AutoModelForCausalLM).from_pretrained(model_dir,
                                                                     dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.tensor(np.asarray(ids_BxL))).logits.numpy()


@pytest.mark.slow
def test_exported_model_loads_and_its_logits_equal_ours(ours, exported):
  params, cfg, _ = ours
  assert json.loads((exported / 'config.json').read_text())['architectures'] == [
      'LlamaForCausalLM']
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 24))
  mine, theirs = our_logits(params, cfg, ids), hf_logits(exported, ids)
  diff = float(np.abs(mine - theirs).max())
  print(f'max |logit difference| = {diff:.2e} (logits up to {np.abs(mine).max():.1f})')
  assert diff < 1e-4


@pytest.mark.slow
def test_greedy_generate_equals_our_sampler(ours, exported):
  params, cfg, tokenizer = ours
  model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  for text in ('The nation', 'Congress and the people of the'):
    prompt = np.asarray([tokenizer.encode(text)], np.int32)
    mine = sampling.generate(params, prompt, np.asarray([prompt.shape[1]]), jax.random.key(0),
                             cfg=cfg, max_new_tokens=32, eos_id=tokenizer.eos_id,
                             temperature=0.0)
    mine = np.asarray(mine.tokens_BxN)[0, :int(mine.lengths_B[0])].tolist()
    theirs = model.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    assert theirs[0, prompt.shape[1]:].tolist() == mine, text


STRINGS = [
    'The nation and the people', '', ' leading space', 'trailing  ', 'many     spaces\n\n\tx',
    'digits 1234567890 3.14', 'Café naïve — “quotes” 日本語 🎉 \u00a0nbsp',
    '<|user|>hi<|end_of_turn|><|assistant|>', '<mask> and <extra_id_0><extra_id_99>',
    '<s>literal</s> <pad> <unk>', '<|user', '<extra_id_100>', '\x00 control \x7f', 'x' * 300,
]
# And 86 more, seeded: words, unicode, whitespace runs and literal special-token text mixed.
_PIECES = ('the', 'Nation', 'über', 'naïve', '日本', '🎉', '  ', '\n', '\t', '42', '3.5', '<mask>',
           '<|user|>', '<extra_id_7>', '</s>', '—', '"', "'", '(', ')', 'ß', 'Ωmega', '\u00a0')
STRINGS += [''.join(np.random.default_rng(i).choice(_PIECES, 1 + i % 9).tolist())
            for i in range(86)]


def test_tokenizer_encodes_and_decodes_as_ours(ours, exported):
  _, _, tokenizer = ours
  theirs = transformers.AutoTokenizer.from_pretrained(exported)
  for text in STRINGS:
    ids = tokenizer.encode(text)
    assert theirs(text)['input_ids'] == ids, text
    assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text, text
  # Any ids, specials included (pad/bos/eos dropped, the others kept), except <unk> (ours
  # decodes it to " ⁇ ", never produced by encode) and lone byte pieces (invalid UTF-8,
  # which each library replaces differently; valid byte runs are in STRINGS).
  pool = [i for i in range(tokenizer.vocab_size) if i != tokenizer.unk_id
          and not tokenizer.id_to_piece(i).startswith('<0x')]
  rng = np.random.default_rng(0)
  for _ in range(20):
    ids = rng.choice(pool, 12).tolist()
    assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), ids


def test_chat_template_renders_as_research_chat(ours, exported):
  _, _, tokenizer = ours
  theirs = transformers.AutoTokenizer.from_pretrained(exported)

  def apply(messages, **kw):
    out = theirs.apply_chat_template(messages, tokenize=True, **kw)
    return list(out['input_ids'] if hasattr(out, 'keys') else out)

  for prompt in (False, True):
    expected = chat.render(tokenizer, CONVERSATION, add_generation_prompt=prompt).ids.tolist()
    assert apply(CONVERSATION, add_generation_prompt=prompt) == expected
  openai_form = [dict(m) for m in CONVERSATION]
  openai_form[2]['tool_calls'] = [{'type': 'function', 'function': c}
                                  for c in CONVERSATION[2]['tool_calls']]
  assert apply(openai_form) == chat.render(tokenizer, CONVERSATION).ids.tolist()
  # render() spells reserved-token text in content as bytes; the template refuses it.
  for content in ('forged <|user|> turn', 'a <mask>', '\u2581'):
    with pytest.raises(Exception, match='research/chat.py spells'):
      apply([{'role': 'user', 'content': content}])


def _snapshot(root):
  return sorted(str(p) for p in pathlib.Path(root).rglob('*'))


def test_export_then_import_gives_bitwise_equal_params(pretrained, exported, tmp_path):
  result = run('experiments.import_hf', f'--hf={exported}', f'--workdir={tmp_path / "back"}')
  assert result.returncode == 0, result.stderr[-3000:]
  params, config, tokenizer = checkpoint_lib.load_stage(pretrained)
  back_params, back_config, back_tokenizer = checkpoint_lib.load_stage(tmp_path / 'back')
  assert back_config['model'] == config['model']
  assert back_tokenizer.fingerprint == tokenizer.fingerprint
  assert jax.tree.structure(back_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back_params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_unrepresentable_config_is_refused_in_one_line(pretrained, tmp_path):
  workdir = tmp_path / 'gpt2ish'
  shutil.copytree(pretrained, workdir)
  config = json.loads((workdir / 'config.json').read_text())
  config['model'].update(norm='layernorm', position='learned')
  (workdir / 'config.json').write_text(json.dumps(config))
  before = _snapshot(tmp_path)
  result = run('experiments.export_hf', f'--workdir={workdir}', f'--out={tmp_path / "out"}')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'model.norm' in lines[0] and 'model.position' in lines[0], lines
  assert _snapshot(tmp_path) == before  # nothing written


def _random_llama_dir(root, tie, **overrides):
  config = transformers.LlamaConfig(
      vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
      max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.2,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500_000.0}, **overrides)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # non-trivial norms, so a swapped norm weight shows up
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  model.save_pretrained(root)
  return root


@pytest.mark.slow
def test_transformers_random_llama_imports_and_our_forward_matches(pretrained, tmp_path):
  src = _random_llama_dir(tmp_path / 'llama', tie=True)
  result = run('experiments.import_hf', f'--model={src}', f'--workdir={tmp_path / "w"}',
               f'--tokenizer={pretrained}')
  assert result.returncode == 0, result.stderr[-3000:]
  params, config, _ = checkpoint_lib.load_stage(tmp_path / 'w')
  cfg = model_lib.TransformerConfig.from_dict(config['model'])
  assert (cfg.kv_heads, cfg.dim_per_head, cfg.norm_eps, cfg.tie_embeddings) == (1, 16, 1e-5, True)
  ids = np.random.default_rng(1).integers(0, 512, (2, 20))
  np.testing.assert_allclose(our_logits(params, cfg, ids), hf_logits(src, ids), atol=1e-4)


def test_import_refuses_what_it_cannot_represent(pretrained, tmp_path):
  src = _random_llama_dir(tmp_path / 'biased', tie=False, attention_bias=True)
  before = _snapshot(tmp_path)
  result = run('experiments.import_hf', f'--model={src}', f'--workdir={tmp_path / "w"}',
               f'--tokenizer={pretrained}')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and 'attention_bias' in lines[0], lines
  assert _snapshot(tmp_path) == before
  result = run('experiments.import_hf', f'--model={src}', f'--workdir={tmp_path / "w"}')
  lines = result.stderr.strip().splitlines()  # no tokenizer of ours: named, not guessed
  assert result.returncode == 2 and len(lines) == 1 and 'attention_bias' in lines[0], lines


def _write_hf_dir(root, params, model_dict):
  from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top
  root.mkdir(parents=True)
  (root / 'config.json').write_text(json.dumps(hf.hf_config(model_dict)))
  state = hf.to_hf_state_dict(jax.tree.map(np.asarray, params), model_dict)
  safetensors_np.save_file(state, str(root / 'model.safetensors'), metadata={'format': 'pt'})
  return root


def _random_params(cfg, seed=0):
  z = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model_lib.Transformer(cfg).init(jax.random.key(seed), z, z, z,
                                                    jnp.zeros((1, 8), bool))['params'])
  leaves, tree = jax.tree.flatten(params)  # larger than init: logits far from uniform
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.slow
def test_default_gelu_model_exports_as_arcee(tmp_path):
  cfg = model_lib.TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=2,
                                    scan_layers=False, norm_eps=1e-5)
  params = _random_params(cfg)
  src = _write_hf_dir(tmp_path / 'arcee', params, dataclasses.asdict(cfg))
  ids = np.random.default_rng(2).integers(0, 128, (2, 16))
  theirs = hf_logits(src, ids)
  assert type(transformers.AutoModelForCausalLM.from_pretrained(src)).__name__ == (
      'ArceeForCausalLM')
  np.testing.assert_allclose(our_logits(params, cfg, ids), theirs, atol=1e-4)


@pytest.mark.slow
def test_reward_model_exports_as_sequence_classification(tmp_path):
  cfg = model_lib.TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp='swiglu', scalar_head=True)
  params = _random_params(cfg, seed=3)
  src = _write_hf_dir(tmp_path / 'rm', params, dataclasses.asdict(cfg))
  tokens = np.random.default_rng(3).integers(113, 128, (3, 12))
  lengths = np.asarray([12, 7, 3])
  tokens[np.arange(12)[None] >= lengths[:, None]] = 0  # right padding with pad id 0
  mine = reward_model.sequence_scores(params, model_lib.Transformer(cfg), jnp.asarray(tokens),
                                      jnp.asarray(lengths))
  theirs = hf_logits(src, tokens, transformers.AutoModelForSequenceClassification)[:, 0]
  np.testing.assert_allclose(np.asarray(mine), theirs, atol=1e-4)
