"""The Hugging Face bridge: our params + config <-> a transformers checkpoint, both ways.

Pure conversions (numpy in, numpy out); experiments/export_hf.py and import_hf.py do
the file handling. The exported directory loads with `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained` and no custom code (tests/test_hf.py checks logits,
greedy generation, the tokenizer and the chat template against transformers itself).

Architectures. Our Transformer with rotary positions and RMSNorm is one of:

  model.mlp='swiglu'  LlamaForCausalLM: down(silu(gate x) * up x)
  model.mlp='gelu'    ArceeForCausalLM: Llama with a non-gated MLP, down(act(up x)),
                      hidden_act='gelu_pytorch_tanh' (= jax.nn.gelu(approximate=True))
  scalar_head=True    {Llama,Arcee}ForSequenceClassification, num_labels=1: `score` is
                      our D×1 head transposed, pooled at the last non-pad token, which is
                      where research/reward_model.py reads it for right-padded rows.

Everything else maps one to one: RMSNorm weight = our scale (no 1 + scale offset),
epsilon = model.norm_eps; rope is the rotate-half ("half-split") form in both, with
the same frequencies theta^(-2i/H), so q/k weights need no permutation (the
permutation in HF's convert_llama_weights is for Meta's interleaved checkpoints);
attention is scaled by 1/sqrt(head_dim) in both; GQA groups query heads the same way
(query head i reads kv head i // (N/K)); tied embeddings are HF's
tie_word_embeddings. z-loss is a training loss term only and there is no logit
soft-capping or QK norm, so nothing else changes the forward pass. Dense weights are
stored transposed (torch Linear is out × in); values are copied bit for bit, in their
own dtype (bfloat16 params stay bfloat16, norms stay float32).

Refused (ConversionError, naming the keys to change): model.norm='layernorm',
model.position='learned', model.d_model not a multiple of model.num_heads (transformers
requires it even with an explicit head_dim), and the objective 'masked' (a
bidirectional model has no causal-LM meaning). On import: any attention/MLP bias,
rope scaling, an activation other than silu (llama) / gelu_pytorch_tanh (arcee), and
other architectures.

Training-only settings (scan_layers, remat, compute_dtype, attention_impl, init_std,
max_len) have no transformers equivalent: the export keeps our whole model config
under the extra config key `research`, which transformers ignores, so an
export -> import round trip restores them (the HF keys stay authoritative).

Tokenizer: tokenizer.json is transformers' own SentencePiece converter
(`SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's normalizer
spec: no dummy prefix, no whitespace collapsing, byte fallback, merges by piece score)
with two fixes so that it encodes exactly like `Tokenizer.encode`: the converter
lets a chunk that equals any vocab piece become that piece (BPE ignore_merges), so
a literal "<s>" would encode to id 2, which SentencePiece never does; merges are
kept (ignore_merges off) and the reserved pieces become added tokens instead: ids
4-112 (user-defined: matched anywhere in the text, decoded as their text) as normal
added tokens, ids 0-3 as special ones that `split_special_tokens` keeps from being
matched in text and `decode(..., skip_special_tokens=True)` drops, as ours does.
Known difference: a literal U+2581 ("▁") in text encodes to the space piece in HF
(its normalizer cannot tell it from an escaped space), to its three byte pieces here.

Chat template (Jinja, in tokenizer_config.json): renders what research/chat.render
renders, for messages it accepts; tool calls may also be in the OpenAI form
{"type": "function", "function": {"name", "arguments": dict}}. render() spells
reserved-token text inside content ("<|user|>", "<mask>", ...) in byte pieces;
a template can only produce text, which the tokenizer would read as the reserved
token, so the template refuses such content (raise_exception) rather than render
something different. It refuses a literal "▁" for the same reason.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from research import model as model_lib
from research import tokenizer as tokenizer_lib

RESEARCH_KEY = 'research'  # our model config, stashed in config.json for the round trip
_TRAINING_ONLY = ('scan_layers', 'remat', 'compute_dtype', 'attention_impl', 'init_std',
                  'max_len')
_ACT = {'swiglu': 'silu', 'gelu': 'gelu_pytorch_tanh'}
_MODEL_TYPE = {'swiglu': 'llama', 'gelu': 'arcee'}
_CLASS_PREFIX = {'llama': 'Llama', 'arcee': 'Arcee'}
_LAYER = 'model.layers.{}.'
# Our per-layer param path -> (HF name suffix, transpose?)
_LAYER_MAP = {
    ('attention', 'query'): ('self_attn.q_proj.weight', True),
    ('attention', 'key'): ('self_attn.k_proj.weight', True),
    ('attention', 'value'): ('self_attn.v_proj.weight', True),
    ('attention', 'out'): ('self_attn.o_proj.weight', True),
    ('attention_norm', 'scale'): ('input_layernorm.weight', False),
    ('mlp_norm', 'scale'): ('post_attention_layernorm.weight', False),
    ('mlp', 'up'): ('mlp.up_proj.weight', True),
    ('mlp', 'down'): ('mlp.down_proj.weight', True),
    ('mlp', 'gate'): ('mlp.gate_proj.weight', True),
}
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some old checkpoints saved


class ConversionError(ValueError):
  """A config or checkpoint that has no exact counterpart on the other side (one line)."""


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def export_problems(model: Mapping[str, Any], objective: str | None = None) -> list[str]:
  """'key=value (want ...)' for each setting no transformers architecture represents."""
  cfg = model_lib.TransformerConfig.from_dict(model)
  problems = []
  if cfg.norm != 'rmsnorm':
    problems.append(f"model.norm={cfg.norm!r} (want 'rmsnorm')")
  if cfg.position != 'rope':
    problems.append(f"model.position={cfg.position!r} (want 'rope')")
  if cfg.d_model % cfg.num_heads:
    problems.append(f'model.d_model={cfg.d_model} (want a multiple of '
                    f'model.num_heads={cfg.num_heads})')
  if objective == 'masked':
    problems.append("objective.name='masked' (a bidirectional model; want a causal "
                    "objective: causal, prefix, span, hybrid or a later stage)")
  return problems


def check_exportable(model: Mapping[str, Any], objective: str | None = None) -> None:
  """Raises ConversionError (one line, naming every key to change) unless exportable."""
  problems = export_problems(model, objective)
  if problems:
    raise ConversionError('no transformers architecture represents this model exactly: '
                          + '; '.join(problems) + ' -- change these config keys')


def hf_config(model: Mapping[str, Any], objective: str | None = None) -> dict:
  """Our model config dict -> the config.json dict of the matching transformers class.

  Args:
    model: the `model` section of a run's config.json (0 meaning None, as there).
    objective: the run's objective name ('masked' is refused).
  Returns:
    A JSON-able dict (Llama or Arcee, ForCausalLM or ForSequenceClassification when
    scalar_head), with our whole model config under RESEARCH_KEY.
  Raises:
    ConversionError: the model is not representable (see `check_exportable`).
  """
  check_exportable(model, objective)
  cfg = model_lib.TransformerConfig.from_dict(model)
  model_type = _MODEL_TYPE[cfg.mlp]
  head = 'ForSequenceClassification' if cfg.scalar_head else 'ForCausalLM'
  out = dict(
      architectures=[f'{_CLASS_PREFIX[model_type]}{head}'], model_type=model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, hidden_act=_ACT[cfg.mlp],
      max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      rope_theta=cfg.rope_theta,  # the pre-v5 spelling, for older readers
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, attention_dropout=0.0,
      mlp_bias=False, initializer_range=cfg.init_std, use_cache=True,
      bos_token_id=tokenizer_lib.BOS_ID, eos_token_id=tokenizer_lib.EOS_ID,
      pad_token_id=tokenizer_lib.PAD_ID, dtype=cfg.param_dtype)
  if cfg.scalar_head:
    out.update(num_labels=1, id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  out[RESEARCH_KEY] = dict(model=dict(model), objective=objective)
  return out


def _architecture(cfg: model_lib.TransformerConfig) -> tuple:
  """What the HF config determines, resolved (None / 0 defaults spelled out)."""
  return (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads,
          cfg.dim_per_head, cfg.hidden_dim, cfg.mlp, cfg.norm, cfg.norm_eps, cfg.position,
          cfg.rope_theta, cfg.tie_embeddings, cfg.scalar_head, cfg.param_dtype)


def _dtype_name(hf: Mapping[str, Any]) -> str:
  return str(hf.get('dtype') or hf.get('torch_dtype') or 'float32').replace('torch.', '')


def model_config_from_hf(hf: Mapping[str, Any]) -> dict:
  """A transformers config.json dict -> our model config dict.

  Llama and Arcee (CausalLM or SequenceClassification with one label). A checkpoint
  exported from here gives back our stashed config verbatim when the HF keys still
  agree with it; otherwise the HF keys decide, settings HF does not have (scan_layers,
  ...) come from the stash if any, else TransformerConfig's defaults (with max_len =
  max_position_embeddings).

  Raises:
    ConversionError: naming every HF config key whose value we cannot represent.
  """
  model_type = hf.get('model_type')
  if model_type not in ('llama', 'arcee'):
    raise ConversionError(f'model_type={model_type!r}: only llama and arcee checkpoints '
                          'import (same blocks as ours)')
  problems = []
  want_act = {'llama': 'silu', 'arcee': 'gelu_pytorch_tanh'}[model_type]
  act = hf.get('hidden_act', want_act)
  if act != want_act and not (model_type == 'arcee' and act == 'gelu_new'):
    problems.append(f'hidden_act={act!r} (want {want_act!r})')
  for key in ('attention_bias', 'mlp_bias'):
    if hf.get(key):
      problems.append(f'{key}=true (no biases here)')
  rope = dict(hf.get('rope_parameters') or {})
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  scaling = hf.get('rope_scaling')
  if scaling and scaling.get('rope_type', scaling.get('type')) not in (None, 'default'):
    rope_type = scaling.get('rope_type', scaling.get('type'))
  if rope_type != 'default':
    problems.append(f'rope_parameters.rope_type={rope_type!r} (want default: no rope scaling)')
  if hf.get('pretraining_tp', 1) != 1:
    problems.append(f'pretraining_tp={hf.get("pretraining_tp")} (want 1)')
  dtype = _dtype_name(hf)
  if dtype not in ('float32', 'bfloat16', 'float16'):
    problems.append(f'dtype={dtype!r} (want float32, bfloat16 or float16)')
  archs = hf.get('architectures') or []
  scalar_head = any(a.endswith('ForSequenceClassification') for a in archs)
  if scalar_head and hf.get('num_labels', len(hf.get('id2label') or {0: 0})) != 1:
    problems.append('num_labels (want 1: a reward model)')
  if problems:
    raise ConversionError('cannot import this checkpoint exactly: ' + '; '.join(problems))

  stashed = dict((hf.get(RESEARCH_KEY) or {}).get('model') or {})
  d_model = int(hf['hidden_size'])
  num_heads = int(hf['num_attention_heads'])
  theta = rope.get('rope_theta', hf.get('rope_theta', 10_000.0))
  model = dict(
      vocab_size=int(hf['vocab_size']), d_model=d_model, num_layers=int(hf['num_hidden_layers']),
      num_heads=num_heads, num_kv_heads=int(hf.get('num_key_value_heads') or num_heads),
      head_dim=int(hf.get('head_dim') or d_model // num_heads),
      mlp_dim=int(hf['intermediate_size']),
      mlp='swiglu' if model_type == 'llama' else 'gelu', norm='rmsnorm',
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), position='rope',
      max_len=int(hf.get('max_position_embeddings') or 2048), rope_theta=float(theta),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), scalar_head=scalar_head,
      param_dtype='bfloat16' if dtype == 'bfloat16' else 'float32',
      init_std=float(hf.get('initializer_range', 0.02)))
  cfg = model_lib.TransformerConfig.from_dict(model)  # validates
  if stashed:
    try:
      same = _architecture(model_lib.TransformerConfig.from_dict(stashed)) == _architecture(cfg)
    except (ValueError, TypeError):
      same = False
    if same:  # exported from here and not edited since: our config exactly as it was
      return stashed
    cfg = dataclasses.replace(cfg, **{k: stashed[k] for k in _TRAINING_ONLY if k in stashed})
  out = dataclasses.asdict(cfg)
  for key in ('num_kv_heads', 'head_dim', 'mlp_dim'):  # the 0-for-None spelling of configs
    out[key] = out[key] or 0
  return out


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def _layers(params, cfg):
  """-> list over layers of {(module, name): array} from scanned or unrolled params."""
  if cfg.scan_layers:
    stacked = params['layers']
    return [{(m, n): stacked[m][n][i] for m in stacked for n in stacked[m]}
            for i in range(cfg.num_layers)]
  return [{(m, n): params[f'layer_{i}'][m][n] for m in params[f'layer_{i}']
           for n in params[f'layer_{i}'][m]} for i in range(cfg.num_layers)]


def to_hf_state_dict(params, model: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our params -> {HF tensor name: numpy array} (torch layout, values bit for bit).

  Args:
    params: the model's params pytree (scanned or unrolled layers, as `model` says),
      jax or numpy arrays, float32 or bfloat16.
    model: our model config dict.
  Returns:
    Contiguous numpy arrays in each param's own dtype; dense weights transposed to
    out × in; no lm_head when embeddings are tied; `score.weight` (1×D) when the model
    has a scalar head.
  Raises:
    ConversionError: not representable (see `check_exportable`).
  """
  check_exportable(model)
  cfg = model_lib.TransformerConfig.from_dict(model)
  arr = lambda x: np.ascontiguousarray(np.asarray(x))
  out = {'model.embed_tokens.weight': arr(params['embed']),
         'model.norm.weight': arr(params['final_norm']['scale'])}
  for i, layer in enumerate(_layers(params, cfg)):
    for key, value in layer.items():
      if key not in _LAYER_MAP:
        raise ConversionError(f'param layer {i} {"/".join(key)} has no HF counterpart')
      name, transpose = _LAYER_MAP[key]
      out[_LAYER.format(i) + name] = arr(np.asarray(value).T if transpose else value)
  if 'unembed' in params:
    out['lm_head.weight'] = arr(params['unembed'])
  if 'scalar_head' in params:
    out['score.weight'] = arr(np.asarray(params['scalar_head']).T)
  return out


def params_from_hf_state_dict(state: Mapping[str, np.ndarray], model: Mapping[str, Any]):
  """{HF tensor name: array} -> our params pytree for `model` (see model_config_from_hf).

  Matrices become model.param_dtype (float16 is widened to float32, exactly), norms and
  the scalar head float32, as our model creates them. Layers are stacked on a leading
  axis when model.scan_layers, else named layer_0, layer_1, ...

  Raises:
    ConversionError: a tensor is missing, has the wrong shape, or is not ours to map
      (the first few names are given).
  """
  cfg = model_lib.TransformerConfig.from_dict(model)
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head,
                      cfg.hidden_dim, cfg.vocab_size)
  used = set()
  pdtype = np.dtype(_np_dtype(cfg.param_dtype))

  def take(name, shape, dtype, transpose=False):
    if name not in state:
      raise ConversionError(f'checkpoint has no tensor {name!r}')
    x = np.asarray(state[name])
    if transpose:
      x = x.T
    if tuple(x.shape) != tuple(shape):
      raise ConversionError(f'tensor {name!r} has shape {tuple(x.shape)} where the config '
                            f'says {tuple(shape)} ({"transposed" if transpose else "as is"})')
    used.add(name)
    return np.ascontiguousarray(x.astype(dtype, copy=False))

  shapes = {('attention', 'query'): (d, n * h), ('attention', 'key'): (d, k * h),
            ('attention', 'value'): (d, k * h), ('attention', 'out'): (n * h, d),
            ('attention_norm', 'scale'): (d,), ('mlp_norm', 'scale'): (d,),
            ('mlp', 'up'): (d, f), ('mlp', 'down'): (f, d)}
  if cfg.mlp == 'swiglu':
    shapes[('mlp', 'gate')] = (d, f)
  layers = []
  for i in range(cfg.num_layers):
    layer = {}
    for (mod, pname), shape in shapes.items():
      hf_name, transpose = _LAYER_MAP[(mod, pname)]
      dtype = np.float32 if pname == 'scale' else pdtype
      layer.setdefault(mod, {})[pname] = take(_LAYER.format(i) + hf_name, shape, dtype,
                                              transpose)
    layers.append(layer)
  params = {'embed': take('model.embed_tokens.weight', (v, d), pdtype),
            'final_norm': {'scale': take('model.norm.weight', (d,), np.float32)}}
  if cfg.scan_layers:
    params['layers'] = {mod: {p: np.stack([l[mod][p] for l in layers]) for p in layers[0][mod]}
                        for mod in layers[0]}
  else:
    params.update({f'layer_{i}': l for i, l in enumerate(layers)})
  if not cfg.tie_embeddings:
    params['unembed'] = take('lm_head.weight', (v, d), pdtype)
  elif 'lm_head.weight' in state:
    if not np.array_equal(np.asarray(state['lm_head.weight']), np.asarray(state[
        'model.embed_tokens.weight'])):
      raise ConversionError('tie_word_embeddings=true but lm_head.weight differs from '
                            'model.embed_tokens.weight')
    used.add('lm_head.weight')
  if cfg.scalar_head:
    params['scalar_head'] = take('score.weight', (d, 1), np.float32, transpose=True)
  unused = sorted(name for name in state if name not in used
                  and not name.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ConversionError(f'{len(unused)} checkpoint tensors have no counterpart here, e.g. '
                          f'{unused[:3]}')
  return params


def _np_dtype(name: str):
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return ml_dtypes.bfloat16
  return np.dtype(name)


# --------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config
# --------------------------------------------------------------------------------------


def tokenizer_json(tokenizer: tokenizer_lib.Tokenizer) -> str:
  """tokenizer.json (the `tokenizers` library's format) encoding exactly as `tokenizer.encode`.

  Built with transformers' SentencePiece converter, then fixed as the module docstring
  says. Raises ConversionError if the SentencePiece model is not a BPE model with byte
  fallback, identity normalisation and no dummy prefix (every tokenizer this codebase
  trains is).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  # The module, not the same-named function transformers exports.
  convert = importlib.import_module('transformers.convert_slow_tokenizer')
  proto = convert.import_protobuf().ModelProto()
  proto.ParseFromString(tokenizer.to_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  problems = [what for what, bad in (
      ('model_type must be BPE', spec.model_type != 2),
      ('byte_fallback must be on', not spec.byte_fallback),
      ('add_dummy_prefix must be off', norm.add_dummy_prefix),
      ('remove_extra_whitespaces must be off', norm.remove_extra_whitespaces),
      ('normalization must be identity', bool(norm.precompiled_charsmap)))
      if bad]
  if problems:
    raise ConversionError('tokenizer.model: ' + ', '.join(problems))
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  built = convert.SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  as_json = json.loads(built.to_str())
  as_json['model']['ignore_merges'] = False
  tok = tokenizers.Tokenizer.from_str(json.dumps(as_json))
  control = [p.piece for p in proto.pieces if p.type == 3]  # <pad> <unk> <s> </s>
  user = [p.piece for p in proto.pieces if p.type == 4]  # <mask> ... <|/tool_result|>
  tok.add_special_tokens([tokenizers.AddedToken(p, normalized=False, special=True)
                          for p in control])
  tok.add_tokens([tokenizers.AddedToken(p, normalized=False, special=False) for p in user])
  for piece in control + user:
    if tok.token_to_id(piece) != vocab[piece]:
      raise ConversionError(f'tokenizer.json: {piece!r} got id {tok.token_to_id(piece)}, '
                            f'not {vocab[piece]}')
  return tok.to_str(pretty=True)


def _chat_template() -> str:
  ids = tokenizer_lib.SPECIAL_TOKENS
  piece = {i: p for p, i in ids.items()}
  chat = tokenizer_lib.CHAT_IDS
  header = {'system': piece[chat['system']], 'user': piece[chat['user']],
            'assistant': piece[chat['assistant']], 'tool': piece[chat['tool_result']]}
  reserved = [p for p, i in ids.items() if i >= tokenizer_lib.MASK_ID] + ['\u2581']
  refuse = ("{{ raise_exception(what ~ ' contains ' ~ piece ~ ': research/chat.py spells "
            "reserved-token text (and U+2581) in byte pieces, which a template cannot') }}")
  return ''.join([
      '{%- set reserved = ', json.dumps(reserved, ensure_ascii=False), ' -%}',
      '{%- macro check(text, what) -%}{%- for piece in reserved -%}',
      '{%- if piece in text -%}', refuse, '{%- endif -%}{%- endfor -%}{%- endmacro -%}',
      '{%- set headers = ', json.dumps(header), ' -%}',
      '{%- for message in messages -%}',
      "{%- if message.role not in headers -%}{{ raise_exception('message ' ~ loop.index0 ~ "
      "': unknown role ' ~ message.role ~ ' (expected system, user, assistant or tool)') }}"
      '{%- endif -%}',
      '{%- set content = message.content if message.content is not none else "" -%}',
      "{%- if content is not string -%}{{ raise_exception('message ' ~ loop.index0 ~ "
      "': content must be a string') }}{%- endif -%}",
      "{{- check(content, 'message ' ~ loop.index0 ~ ' content') -}}",
      '{{- headers[message.role] -}}{{- content -}}',
      "{%- if message.role == 'assistant' and message.tool_calls -%}",
      '{%- for call in message.tool_calls -%}',
      '{%- set f = call.function if call.function is defined else call -%}',
      "{%- if f.arguments is not mapping -%}{{ raise_exception('message ' ~ loop.index0 ~ "
      "': tool call arguments must be a dict (JSON object), not a string') }}{%- endif -%}",
      "{%- set call_json = {'name': f.name, 'arguments': f.arguments} | tojson(sort_keys=True) -%}",
      "{{- check(call_json, 'a tool call') -}}",
      piece[chat['tool_call']], '{{- call_json -}}', piece[chat['tool_call_end']],
      '{%- endfor -%}{%- endif -%}',
      "{%- if message.role == 'tool' -%}", piece[chat['tool_result_end']],
      '{%- else -%}', piece[chat['end_of_turn']], '{%- endif -%}',
      '{%- endfor -%}',
      '{%- if add_generation_prompt -%}', header['assistant'], '{%- endif -%}',
  ])


CHAT_TEMPLATE = _chat_template()


def tokenizer_config(max_len: int) -> dict:
  """tokenizer_config.json: the fast tokenizer as tokenizer.json defines it, no bos/eos
  added (ours adds none), control tokens never matched in text, and the chat template."""
  return dict(
      tokenizer_class='PreTrainedTokenizerFast', bos_token='<s>', eos_token='</s>',
      unk_token='<unk>', pad_token='<pad>', add_bos_token=False, add_eos_token=False,
      split_special_tokens=True, clean_up_tokenization_spaces=False,
      model_max_length=int(max_len), padding_side='right', chat_template=CHAT_TEMPLATE)


def generation_config() -> dict:
  """generation_config.json: stop at </s> or at the end of an assistant turn."""
  return dict(bos_token_id=tokenizer_lib.BOS_ID, pad_token_id=tokenizer_lib.PAD_ID,
              eos_token_id=[tokenizer_lib.EOS_ID, tokenizer_lib.CHAT_IDS['end_of_turn']],
              do_sample=False)
