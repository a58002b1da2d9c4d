"""The Hugging Face bridge: `python -m experiments.export_hf` / `experiments.import_hf`.

  python -m experiments.export_hf --workdir=runs/sft --out=hf/sft
  python -m experiments.import_hf --model=hf/some-llama --workdir=runs/imported
      [--tokenizer=runs/pretrain/tokenizer.model]

The flags name the folders; this config holds the few choices (`--config.KEY=VALUE`).
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  # export: '' writes every tensor in the dtype it was trained in (bit-exact);
  # 'bfloat16' halves a float32 model's file (norms stay float32, as ours are).
  c.dtype = ''
  # import, when the checkpoint was not exported from here (else its own settings):
  c.scan_layers = True  # scan the layer stack (deep models; see configs/pretrain.py)
  c.max_len = 0  # 0: max_position_embeddings (rope models: only the SFT seq_len bound)
  return c
