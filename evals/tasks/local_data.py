"""Loaders for the task YAMLs in this folder: the public data sets in ../shared/data,
read from disk (no network), as `datasets.DatasetDict`s for lm_eval's `custom_dataset`.

The data folder is $RESEARCH_SHARED_DATA when set, else `shared/data` next to this
checkout (REPO/../shared/data). A missing file raises FileNotFoundError naming it.
"""
import json
import os
import pathlib

import datasets

REPO = pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('RESEARCH_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def _file(*parts) -> pathlib.Path:
  path = data_dir().joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file (set RESEARCH_SHARED_DATA to the data folder)')
  return path


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def piqa(**unused):
  """PIQA validation: goal, sol1, sol2, label (0/1, from valid-labels.lst)."""
  docs = _jsonl(_file('piqa', 'valid.jsonl'))
  labels = [int(x) for x in _file('piqa', 'valid-labels.lst').read_text().split()]
  if len(labels) != len(docs):
    raise ValueError(f'piqa: {len(docs)} examples but {len(labels)} labels')
  rows = [dict(goal=d['goal'], sol1=d['sol1'], sol2=d['sol2'], label=l)
          for d, l in zip(docs, labels)]
  return datasets.DatasetDict({'validation': datasets.Dataset.from_list(rows)})


def openbookqa(**unused):
  """OpenBookQA test: question, choices (4 texts), label (index of answerKey)."""
  rows = []
  for d in _jsonl(_file('openbookqa-test.jsonl')):
    choices = d['question']['choices']
    rows.append(dict(question=d['question']['stem'], choices=[c['text'] for c in choices],
                     label=[c['label'] for c in choices].index(d['answerKey'])))
  return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})


def bbh(subtask=None, **unused):
  """One BIG-Bench Hard task: input, target."""
  if not subtask:
    raise ValueError('bbh: dataset_kwargs.subtask is required')
  examples = json.loads(_file('bbh', f'{subtask}.json').read_text())['examples']
  rows = [dict(input=e['input'], target=str(e['target'])) for e in examples]
  return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})


def gsm8k(**unused):
  """GSM8K train and test: question, answer (step-by-step, final answer after '#### ')."""
  return datasets.DatasetDict({
      split: datasets.Dataset.from_list(
          [dict(question=d['question'], answer=d['answer'])
           for d in _jsonl(_file('gsm8k', f'{split}.jsonl'))])
      for split in ('train', 'test')})
