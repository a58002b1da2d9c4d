"""Mutation check: do the tests catch the bugs they are meant to protect against?

Each entry of MUTATIONS puts one small, deliberate bug into one file (a textual
replacement of a snippet that must occur exactly once, so a stale entry fails loudly),
runs the tests named for it in a subprocess and restores the file (in a `finally`, so
also on Ctrl-C). A mutation is *caught* when those tests fail, *survived* when they
pass; anything else (a collection error, no test selected) is an *error*.

  python dev/mutation_check.py            # every mutation; exit 1 if any survived
  python dev/mutation_check.py --list     # names, files and tests
  python dev/mutation_check.py --only NAME [--only NAME ...]
  python dev/mutation_check.py --clean    # first run each entry's tests unmutated

Not run by CI and not collected by pytest (dev/ is outside tests/). Run it from the
repository root with the project's venv active. To add an entry, append a `Mutation`
to MUTATIONS: its `tests` are pytest arguments (node ids, files, '-k', 'expr').
"""
import argparse
import dataclasses
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  file: str  # relative to the repository root
  old: str  # must occur exactly once in the file
  new: str
  tests: tuple  # pytest arguments selecting the tests that should catch it
  kind: str = ''  # the family of tests it checks (for the table)


MUTATIONS = [
    # --- objectives: alignment of targets, exact corruption -----------------------------
    Mutation('span_drop_shift', 'research/objectives.py',
             "targets = jnp.concatenate([out[1:], jnp.full((1,), ids.pad, tokens.dtype)])",
             "targets = out",
             ('tests/test_objectives.py', '-k', 'span'), 'objectives'),
    Mutation('hybrid_drop_shift', 'research/objectives.py',
             "selected_next = jnp.concatenate([selected[:, 1:], jnp.zeros_like(selected[:, :1])], axis=1)",
             "selected_next = selected",
             ('tests/test_objectives.py', '-k', 'hybrid'), 'objectives'),
    Mutation('hybrid_causal_rows_corrupted', 'research/objectives.py',
             "inputs=jnp.where(c, tokens, corrupted)", "inputs=corrupted",
             ('tests/test_objectives.py', '-k', 'hybrid'), 'objectives'),
    Mutation('bert_fewer_random_replacements', 'research/objectives.py',
             "(kind >= 0.8) & (kind < 0.9)", "(kind >= 0.8) & (kind < 0.85)",
             ('tests/test_objectives.py', '-k', 'masked'), 'objectives'),
    Mutation('prefix_lm_split_per_token', 'research/objectives.py',
             "frac = jnp.take_along_axis(u_BxL, seg, axis=1)", "frac = jnp.roll(u_BxL, 1, axis=0)",
             ('tests/test_objectives.py', '-k', 'prefix'), 'objectives'),

    # --- train step: numbers against hand computations ----------------------------------
    Mutation('grad_summed_not_averaged', 'research/train_step.py',
             "grads = jax.tree.map(lambda g: g / n, grads)", "grads = grads",
             ('tests/test_train_step.py', '-k', 'hand or accumulation'), 'train_step'),
    Mutation('lr_schedule_no_final_fraction', 'research/train_step.py',
             "peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction",
             "peak, end = cfg.learning_rate, cfg.learning_rate * 0.0",
             ('tests/test_train_step.py', '-k', 'schedule'), 'train_step'),
    Mutation('lr_metric_one_step_ahead', 'research/train_step.py',
             "learning_rate=schedule(state.step)", "learning_rate=schedule(state.step + 1)",
             ('tests/test_train_step.py', '-k', 'schedule'), 'train_step'),
    Mutation('z_loss_not_differentiated', 'research/train_step.py',
             "return loss + z, dict(loss_sum=loss + z,", "return loss, dict(loss_sum=loss + z,",
             ('tests/test_train_step.py', '-k', 'hand'), 'train_step'),
    Mutation('loss_metric_includes_z', 'research/train_step.py',
             "metrics = dict(loss=(sums['loss_sum'] - sums['z_loss_sum']) / n,",
             "metrics = dict(loss=sums['loss_sum'] / n,",
             ('tests/test_train_step.py', '-k', 'hand'), 'train_step'),
    Mutation('accumulation_averages_microbatches', 'research/train_step.py',
             "return jax.tree.map(jnp.add, carry, (g, s)), None",
             "return jax.tree.map(jnp.add, carry, (jax.tree.map(lambda x: x / grad_accum_steps, g), s)), None",
             ('tests/test_train_step.py', '-k', 'accumulation'), 'train_step'),
    Mutation('no_weight_decay_mask', 'research/train_step.py',
             "weight_decay=cfg.weight_decay,\n                  mask=decay_mask)",
             "weight_decay=cfg.weight_decay)",
             ('tests/test_train_step.py', '-k', 'hand'), 'train_step'),

    # --- PPO / GRPO: wiring inside make_ppo_iteration ------------------------------------
    Mutation('drop_advantage_whitening', 'research/ppo.py',
             "  if cfg.whiten_advantages:\n    advantages = whiten(advantages, x.mask_BxN)",
             "  pass",
             ('tests/test_ppo.py', '-k', 'gae_iteration'), 'ppo'),
    Mutation('grpo_kl_sign_flipped', 'research/ppo.py',
             "total = total + beta * kl", "total = total - beta * kl",
             ('tests/test_ppo.py', '-k', 'huge_fixed_beta_keeps_the_grpo'), 'ppo'),
    Mutation('rewards_use_config_beta', 'research/ppo.py',
             "x.mask_BxN, x.beta, x.done_B,",
             "x.mask_BxN, cfg.beta, x.done_B,",
             ('tests/test_ppo.py', '-k', 'gae_iteration'), 'ppo'),
    Mutation('gae_gamma_lambda_swapped', 'research/ppo.py',
             "gae(rewards, x.values_BxN, x.mask_BxN, cfg.gamma, cfg.lam)",
             "gae(rewards, x.values_BxN, x.mask_BxN, cfg.lam, cfg.gamma)",
             ('tests/test_ppo.py', '-k', 'gae_iteration'), 'ppo'),
    Mutation('grpo_no_eos_penalty_on_wrong_rows', 'research/ppo.py',
             "return x.score_B - cfg.no_eos_penalty * (~x.done_B).astype(F32)",
             "return x.score_B - 0.5 * (~x.done_B).astype(F32)",
             ('tests/test_ppo.py', '-k', 'no_eos_penalty_before'), 'ppo'),

    # --- evaluation: each metric against a brute-force forward ---------------------------
    Mutation('cloze_readout_reversed', 'research/evaluation.py',
             "jnp.where(read_next, shifted_BxL, pred_BxL)", "jnp.where(read_next, pred_BxL, shifted_BxL)",
             ('tests/test_evaluation.py', '-k', 'cloze'), 'evaluation'),
    Mutation('causal_loss_bidirectional', 'research/evaluation.py',
             "example = objectives.causal(batch, None, None)",
             "example = dict(objectives.causal(batch, None, None), prefix=batch['segment_ids'] > 0)",
             ('tests/test_evaluation.py', '-k', 'causal_loss'), 'evaluation'),
    Mutation('pll_readout_reversed', 'research/evaluation.py',
             "reads.append(t_N - (1 if readout == 'next' else 0))",
             "reads.append(t_N - (0 if readout == 'next' else 1))",
             ('tests/test_evaluation.py', '-k', 'pseudo'), 'evaluation'),
    Mutation('choice_causal_read_in_place', 'research/evaluation.py',
             "jnp.take_along_axis(log_p_BxLxV[:, :-1], tokens_BxL[:, 1:, None], axis=2)",
             "jnp.take_along_axis(log_p_BxLxV[:, 1:], tokens_BxL[:, 1:, None], axis=2)",
             ('tests/test_evaluation.py', '-k', 'choice'), 'evaluation'),
    Mutation('choice_accuracy_ties_count_right', 'research/evaluation.py',
             "correct = int(np.sum((best == np.asarray(labels_N)) & unique))",
             "correct = int(np.sum(best == np.asarray(labels_N)))",
             ('tests/test_evaluation.py', '-k', 'choice'), 'evaluation'),

    # --- scaling fits and intervals -------------------------------------------------------
    Mutation('compute_optimal_a_b_swapped', 'research/scaling_fit.py',
             "    return self.beta / (self.alpha + self.beta)\n\n  @property\n  def b(self) -> float:\n"
             "    \"\"\"D_opt ∝ C^b.\"\"\"\n    return self.alpha / (self.alpha + self.beta)",
             "    return self.alpha / (self.alpha + self.beta)\n\n  @property\n  def b(self) -> float:\n"
             "    \"\"\"D_opt ∝ C^b.\"\"\"\n    return self.beta / (self.alpha + self.beta)",
             ('tests/test_scaling_fit.py', '-k', 'approach2_recovers or exponents or minimum'),
             'scaling_fit'),
    Mutation('approach2_bootstrap_without_resampling', 'research/scaling_fit.py',
             "idx = np.concatenate([rng.choice(g, len(g)) for g in groups])",
             "idx = np.concatenate(groups)",
             ('tests/test_scaling_fit.py', '-k', 'approach2_bootstrap'), 'scaling_fit'),
    Mutation('approach2_b_from_n_opt', 'research/scaling_fit.py',
             "b=power_law(cs, [f.d_opt for f in good])", "b=power_law(cs, [f.n_opt for f in good])",
             ('tests/test_scaling_fit.py', '-k', 'approach2_recovers'), 'scaling_fit'),
    Mutation('power_law_se_wrong_dof', 'research/scaling_fit.py',
             "resid @ resid / (m - 2)", "resid @ resid / (m - 1)",
             ('tests/test_scaling_fit.py', '-k', 'power_law'), 'scaling_fit'),
    Mutation('interval_90_percent', 'research/scaling_fit.py',
             "np.percentile(s, [50 * (1 - level), 50 * (1 + level)])",
             "np.percentile(s, [100 * (1 - level), 100 * level])",
             ('tests/test_scaling_fit.py', '-k', 'power_law'), 'scaling_fit'),

    # --- sampling log-probs ---------------------------------------------------------------
    Mutation('decode_position_off_by_one', 'research/sampling.py',
             "decode_step(params, token_B, lengths_B + t - 1, cache, cfg=cfg)",
             "decode_step(params, token_B, lengths_B + t, cache, cfg=cfg)",
             ('tests/test_sampling.py', '-k', 'greedy_output or sampled_logprobs'), 'sampling'),
    Mutation('logprob_of_tempered_logits', 'research/sampling.py',
             "logprob_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0] - log_z_B",
             "logprob_B = jax.nn.log_softmax(tempered_BxV)[jnp.arange(token_B.shape[0]), token_B]",
             ('tests/test_sampling.py', '-k', 'sampled_logprobs'), 'sampling'),

    # --- code that was never run ----------------------------------------------------------
    Mutation('complete_drops_eos', 'research/sampling.py',
             "outputs.extend(list(map(int, tokens[i, :n[i]])) for i in range(len(chunk)))",
             "outputs.extend(list(map(int, tokens[i, :n[i] - 1])) for i in range(len(chunk)))",
             ('tests/test_sampling.py', '-k', 'complete'), 'never_run'),
    Mutation('complete_prompt_length_off', 'research/sampling.py',
             "      lengths[i] = len(p)\n", "      lengths[i] = max(len(p) - 1, 1)\n",
             ('tests/test_sampling.py', '-k', 'complete'), 'never_run'),
    Mutation('sample_script_ignores_temperature', 'experiments/sample.py',
             "pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k,",
             "pad_id=tokenizer.pad_id, temperature=1.0, top_k=top_k,",
             ('tests/test_sampling.py', '-k', 'sample_script'), 'never_run'),
    Mutation('bf16_silently_float32', 'research/kernels.py',
             "  if compute_dtype == F32:\n    return x.astype(F32)",
             "  if True:\n    return x.astype(F32)",
             ('tests/test_model.py', '-k', 'bfloat16'), 'never_run'),
    Mutation('bf16_attention_transpose_not_row_major', 'research/kernels.py',
             "  return _row_major(jnp.swapaxes(_operand(x, compute_dtype), 2, 3))",
             "  return jnp.swapaxes(_operand(x, compute_dtype), 2, 3)",
             ('tests/test_kernels.py', '-k', 'native_bf16'), 'kernels'),
    Mutation('bf16_attention_prefix_keys_ignored', 'research/kernels.py',
             "  visible = (kpos <= qpos)[None] | prefix[:, None, :kl]",
             "  visible = (kpos <= qpos)[None]",
             ('tests/test_kernels.py', '-k', 'attention_blocked'), 'kernels'),
    Mutation('remat_dots_rejected', 'research/model.py',
             "('remat', ('none', 'full', 'dots'))", "('remat', ('none', 'full'))",
             ('tests/test_model.py', '-k', 'remat_gives'), 'never_run'),
    Mutation('piqa_solutions_swapped', 'experiments/compare_objectives.py',
             "return [(e['goal'], e['sol1'], e['sol2']) for e in examples]",
             "return [(e['goal'], e['sol2'], e['sol1']) for e in examples]",
             ('tests/test_compare_objectives.py', '-k', 'piqa'), 'never_run'),
    Mutation('piqa_labels_not_truncated', 'experiments/compare_objectives.py',
             "examples, labels = examples[:max_examples], labels[:max_examples]",
             "examples = examples[:max_examples]",
             ('tests/test_compare_objectives.py', '-k', 'piqa'), 'never_run'),
    # --- resume: a resumed run must be shown to have resumed -----------------------------
    # Restore switched off entirely: every stage's resume test must fail (a run that
    # silently retrains from step 0 ends with the same numbers, so equal results alone
    # cannot tell; the tests assert the restored step and the steps taken).
    *[Mutation(f'restore_off_{stage}', 'experiments/loop.py',
               "    found = self.ckpt.restore_latest(abstract_state, data_iterator, _DATA_STATE)\n",
               "    found = None\n", tests, 'resume')
      for stage, tests in (
          ('pretrain', ('tests/test_pretrain.py', '-k', 'kill_9')),
          ('cross_mesh', ('tests/test_pretrain.py', '-k', 'mesh')),
          ('sft', ('tests/test_sft.py', '-k', 'resumes')),
          ('reward_model', ('tests/test_reward_model_experiment.py', '-k', 'resumes')),
          ('rlhf', ('tests/test_rlhf.py', '-k', 'resume')),
          ('pipeline', ('tests/test_pipeline.py', '-k', 'kill')))],
    Mutation('restored_state_ignored', 'experiments/loop.py',
             "      state = restored.state\n    elif init_params is not None:",
             "      state = train_lib.make_train_state(model, tx, mesh, train_lib.init_rng("
             "config['seed']), dc['batch_size'], dc['seq_len'])\n    elif init_params is not None:",
             ('tests/test_pretrain.py', '-k', 'kill_9'), 'resume'),
    Mutation('grain_iterator_not_restored', 'research/checkpoint.py',
             "          data_iterator.set_state(meta[data_state_key])", "          pass",
             ('tests/test_pretrain.py', '-k', 'kill_9'), 'resume'),
    Mutation('sampler_position_not_restored_rm', 'research/checkpoint.py',
             "          data_iterator.set_state(meta[data_state_key])", "          pass",
             ('tests/test_reward_model_experiment.py', '-k', 'resumes'), 'resume'),
    Mutation('prompt_position_not_restored_rlhf', 'research/checkpoint.py',
             "          data_iterator.set_state(meta[data_state_key])", "          pass",
             ('tests/test_rlhf.py', '-k', 'resume'), 'resume'),
    Mutation('metrics_not_truncated', 'experiments/loop.py',
             "    truncate_metrics(self.workdir, latest)\n", "",
             ('tests/test_pretrain.py', '-k', 'kill_9'), 'resume'),
    Mutation('rlhf_evals_not_restored', 'experiments/rlhf.py',
             "      evals, timing = restored.meta['evals'], restored.meta['timing']",
             "      pass", ('tests/test_rlhf.py', '-k', 'resume'), 'resume'),
    Mutation('final_checkpoint_skipped', 'experiments/loop.py',
             "      if interrupted or self.save_final:\n        checkpoint(step)",
             "      if interrupted:\n        checkpoint(step)",
             ('tests/test_sft.py', '-k', 'resumes'), 'resume'),

    # --- issue 20: objective records, UL2, RLOO / Dr. GRPO, DPO -------------------------
    Mutation('objective_record_passes_every_key', 'research/objectives.py',
             "return self.make(**{k: objective_config[k] for k in self.keys if k in objective_config})",
             "return self.make(**{k: v for k, v in objective_config.items() if k != 'name' and k in self.keys or k == 'mask_rate'})",
             ('tests/test_objectives.py', '-k', 'record'), 'objectives'),
    Mutation('ul2_mode_token_missing', 'research/objectives.py',
             "inputs=jnp.concatenate([mode_Bx1, ex['inputs']], axis=1),",
             "inputs=jnp.concatenate([ex['inputs'][:, :1], ex['inputs']], axis=1),",
             ('tests/test_objectives.py', '-k', 'ul2'), 'objectives'),
    Mutation('ul2_s_target_in_prefix', 'research/objectives.py',
             "weights = (idx_1xM >= split_Bx1 - 1) & (idx_1xM < m - 1) & next_real",
             "weights = (idx_1xM >= split_Bx1 - 2) & (idx_1xM < m - 1) & next_real",
             ('tests/test_objectives.py', '-k', 'ul2'), 'objectives'),
    Mutation('ul2_mixture_order_swapped', 'research/objectives.py',
             "mixture = np.asarray([mix_r, mix_s, mix_x], np.float64)",
             "mixture = np.asarray([mix_r, mix_x, mix_s], np.float64)",
             ('tests/test_objectives.py', '-k', 'ul2'), 'objectives'),
    Mutation('rloo_self_in_baseline', 'research/ppo.py',
             "return _per_token(s_GxK - others_Gx1 / (group_size - 1), same_Gx1, mask_BxN)",
             "return _per_token(s_GxK - (others_Gx1 + s_GxK) / group_size, same_Gx1, mask_BxN)",
             ('tests/test_ppo.py', '-k', 'rloo'), 'ppo'),
    Mutation('rloo_kl_not_in_reward', 'research/ppo.py',
             "final_B = _final_scores(x, cfg) - x.beta * kl_B",
             "final_B = _final_scores(x, cfg)",
             ('tests/test_ppo.py', '-k', 'rloo_and_dr_grpo'), 'ppo'),
    Mutation('dr_grpo_divides_by_std', 'research/ppo.py',
             "return _per_token(s_GxK - jnp.mean(s_GxK, axis=1, keepdims=True), same_Gx1, mask_BxN)",
             "return _per_token((s_GxK - jnp.mean(s_GxK, axis=1, keepdims=True)) / (jnp.std(s_GxK, axis=1, keepdims=True) + 1e-6), same_Gx1, mask_BxN)",
             ('tests/test_ppo.py', '-k', 'dr_grpo'), 'ppo'),
    Mutation('dr_grpo_length_normalised', 'research/ppo.py',
             "Estimator('dr_grpo', _estimate_dr_grpo, length_normalised=False),",
             "Estimator('dr_grpo', _estimate_dr_grpo),",
             ('tests/test_ppo.py', '-k', 'length_normalised'), 'ppo'),
    Mutation('group_identical_scores_residue', 'research/ppo.py',
             "advantage_B = jnp.where(same_Gx1, 0.0, advantage_GxK).reshape(-1)",
             "advantage_B = advantage_GxK.reshape(-1)",
             ('tests/test_ppo.py', '-k', 'identical'), 'ppo'),
    Mutation('dpo_sign_flip', 'research/dpo.py',
             "margin_B = chosen_reward_B - rejected_reward_B",
             "margin_B = rejected_reward_B - chosen_reward_B",
             ('tests/test_dpo.py',), 'dpo'),
    Mutation('dpo_ipo_target_wrong', 'research/dpo.py',
             "value = jnp.mean(jnp.square(margin_B / beta - 1.0 / (2.0 * beta)))",
             "value = jnp.mean(jnp.square(margin_B - 1.0 / (2.0 * beta)))",
             ('tests/test_dpo.py', '-k', 'hand'), 'dpo'),
    Mutation('dpo_reference_recomputed_on_resume', 'experiments/dpo.py',
             "  if path.exists():\n    with np.load(path) as z:",
             "  if False:\n    with np.load(path) as z:",
             ('tests/test_dpo.py', '-k', 'resumes'), 'dpo'),
    Mutation('dpo_response_start_off_by_one', 'research/dpo.py',
             "return np.maximum(first, 1).astype(np.int32)",
             "return np.maximum(first + 1, 1).astype(np.int32)",
             ('tests/test_dpo.py', '-k', 'response_starts'), 'dpo'),
    # --- prepared shards: equivalence, hosts, resume, integrity, bad input ---------------
    Mutation('shard_positions_not_restarted', 'research/shards.py',
             "positions[col:col + n] = np.arange(n)", "positions[col:col + n] = np.arange(col, col + n)",
             ('tests/test_shards.py', '-k', 'in_memory_rows'), 'shards'),
    Mutation('hosts_read_the_same_rows', 'research/data.py',
             "ds = ds[index::count]", "ds = ds[0::count]",
             ('tests/test_shards.py', '-k', 'two_processes'), 'shards'),
    Mutation('half_written_shards_kept', 'experiments/prepare_data.py',
             "# half-written files of a killed run\n    stale.unlink()",
             "# half-written files of a killed run\n    pass",
             ('tests/test_shards.py', '-k', 'kill_during'), 'shards'),
    Mutation('shards_not_deterministic', 'research/shards.py',
             "data.split_key(t, split_seed)[:8]", "data.split_key(t + str(os.getpid()), split_seed)[:8]",
             ('tests/test_shards.py', '-k', 'kill_during'), 'shards'),
    Mutation('mixture_change_accepted', 'research/shards.py',
             "if saved == current or allow_change:", "if True:",
             ('tests/test_shards.py', '-k', 'resumes_exactly'), 'shards'),
    Mutation('mixture_order_unseeded', 'research/shards.py',
             "shuffle(seed=_sub_seed(seed, k))",
             "shuffle(seed=_sub_seed(seed, k) + __import__('time').time_ns() % 1000)",
             ('tests/test_shards.py', '-k', 'resumes_exactly or deterministic'), 'shards'),
    Mutation('block_crc_unchecked', 'research/shards.py',
             "if zlib.crc32(self._pread(size, block * BLOCK_BYTES)) != self.crcs[block]:",
             "if False:", ('tests/test_shards.py', '-k', 'corrupted'), 'shards'),
    Mutation('parquet_column_checked_late', 'research/shards.py',
             "    if kind == data.KIND_PARQUET:\n      data.check_parquet(path, text_field)\n", "",
             ('tests/test_shards.py', '-k', 'parquet'), 'shards'),
    Mutation('unlisted_shard_files_ignored', 'research/shards.py',
             "if m and int(m.group(1)) not in listed:", "if False:",
             ('tests/test_shards.py', '-k', 'manifest_that'), 'shards'),
    Mutation('mixture_weights_unchecked', 'research/shards.py',
             "  if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:",
             "  if False:", ('tests/test_shards.py', '-k', 'bad_mixtures'), 'shards'),
    # --- text policy, lengths, empty sets (issue 19, kinds 3 and 4) ---------------------
    Mutation('corpus_special_text_as_ids', 'research/data.py',
             "token_lists = tokenizer.encode_text_batch([d.text for d in docs], num_threads)",
             "token_lists = tokenizer.encode_batch([d.text for d in docs], num_threads)",
             ('tests/test_bad_text.py', '-k', 'special_token_text or objectives_still'), 'text'),
    Mutation('shard_special_text_as_ids', 'research/shards.py',
             "ids = tokenizer.encode_text_batch(batch, num_threads=1)",
             "ids = tokenizer.encode_batch(batch, num_threads=1)",
             ('tests/test_bad_text.py', '-k', 'special_token_text'), 'text'),
    Mutation('prompt_special_text_as_ids', 'research/sampling.py',
             "encode = tokenizer.encode_text if encode is None else encode",
             "encode = tokenizer.encode if encode is None else encode",
             ('tests/test_bad_text.py', '-k', 'fill_reads_only_mask'), 'text'),
    Mutation('jsonl_surrogate_unchecked', 'research/data.py',
             "  problem = tokenizer_lib.text_problem(record)\n  if problem:\n    raise DataError",
             "  problem = None\n  if problem:\n    raise DataError",
             ('tests/test_bad_text.py', '-k', 'every_jsonl_loader'), 'text'),
    Mutation('conversation_surrogate_unchecked', 'research/conversations.py',
             "      problem = tokenizer_lib.text_problem(record)", "      problem = None",
             ('tests/test_bad_text.py', '-k', 'every_jsonl_loader or sft_with'), 'text'),
    Mutation('old_shards_with_reserved_ids_read', 'research/shards.py',
             'if manifest.get("special_text") != SPECIAL_TEXT and forged:', 'if False:',
             ('tests/test_bad_text.py', '-k', 'prepare_data'), 'text'),
    Mutation('prepare_leaves_folder_after_bad_record', 'experiments/prepare_data.py',
             "      shutil.rmtree(out, ignore_errors=True)", "      pass",
             ('tests/test_bad_text.py', '-k', 'prepare_data'), 'text'),
    Mutation('study_without_validation_split', 'experiments/compare_objectives.py',
             "  if not val_docs:  # the study compares held-out losses", "  if False:  #",
             ('tests/test_bad_text.py', '-k', 'studies'), 'lengths'),
    Mutation('causal_loss_zero_on_no_tokens', 'research/evaluation.py',
             "return total / count if count else None", "return total / max(count, 1.0)",
             ('tests/test_bad_text.py', '-k', 'studies'), 'lengths'),
    Mutation('warmup_starts_at_zero', 'research/train_step.py',
             "peak * (t + 1) / max(warmup, 1)", "peak * t / max(warmup, 1)",
             ('tests/test_train_step.py', '-k', 'schedule'), 'lengths'),
    Mutation('heldout_loss_zero_on_no_tokens', 'research/evaluation.py',
             "loss / n if n else None", "loss / max(n, 1.0)",
             ('tests/test_bad_text.py', '-k', 'zero_items'), 'lengths'),
    Mutation('sample_context_rule_prompt_only', 'experiments/sample.py',
             "    if n + max_new_tokens - 1 > cfg.max_len:", "    if n > cfg.max_len:",
             ('tests/test_bad_text.py', '-k', 'prompt_past_the_context'), 'lengths'),
    Mutation('chat_system_before_history', 'research/chat.py',
             "for prefix in ([sys_len, 0] if has_system else [0]):",
             "for prefix in ([0, sys_len] if has_system else [0]):",
             ('tests/test_bad_text.py', '-k', 'chat_drops_whole_turns'), 'lengths'),

    # --- bad input (issue 19): damaged checkpoints, dropped rows, one error path ----------
    Mutation('damaged_checkpoint_no_fallback', 'research/checkpoint.py',
             "      damaged.append((step, reason))\n", "      raise CheckpointError(reason)\n",
             ('tests/test_damaged_checkpoints.py', '-k', 'resume_falls_back and truncated'),
             'bad_input'),
    Mutation('damaged_checkpoint_left_in_place', 'research/checkpoint.py',
             "where = f' (the damaged steps moved to {self.move_aside("
             "[s for s, _ in damaged])}/)'", "where = ''",
             ('tests/test_damaged_checkpoints.py', '-k', 'resume_falls_back and truncated'),
             'bad_input'),
    Mutation('checkpoint_verify_skips_chunks', 'research/checkpoint.py',
             "    if not metadata_of_state(folder).get('use_ocdbt', False):", "    if True:",
             ('tests/test_damaged_checkpoints.py', '-k', 'data_file_missing'), 'bad_input'),
    Mutation('budgets_grouped_exactly', 'research/scaling_fit.py',
             "limit = math.log1p(tolerance) * (1 + 1e-12)", "limit = 1e-12",
             ('tests/test_scaling_fit.py', '-k', 'jittered'), 'bad_input'),
    Mutation('report_lists_dropped_rows_as_used', 'experiments/scaling_fit.py',
             "  for i in used:\n    lines.append(", "  for i in range(len(rows)):\n    lines.append(",
             ('tests/test_scaling_fit.py', '-k', 'dropped_rows'), 'bad_input'),
    Mutation('bad_flag_is_absl_exit_1', 'experiments/common.py',
             ", flags_parser=_parse_flags)", ")",
             ('tests/test_entry_point_errors.py', '-k', 'nope_flag'), 'bad_input'),
    Mutation('sft_empty_jsonl_unchecked', 'experiments/sft.py',
             "    if not convs:\n      raise common.UserError(",
             "    if False:\n      raise common.UserError(",
             ('tests/test_entry_point_errors.py', '-k', 'sft_jsonl'), 'bad_input'),

    # --- several processes (2 × 4 against 1 × 8; minutes: the launches dominate) ----------
    Mutation('rl_every_process_feeds_all_prompts', 'experiments/rlhf.py',
             "iteration(state, np.asarray(prompt)[rows],\n                                        np.asarray(lengths)[rows],",
             "iteration(state, np.asarray(prompt),\n                                        np.asarray(lengths),",
             ('tests/test_multihost.py', '-k', 'reward_model_and_rl'), 'multihost'),
    Mutation('reward_model_every_process_feeds_all_pairs', 'experiments/reward_model.py',
             "take(train_arrays, idx[rows])", "take(train_arrays, idx)",
             ('tests/test_multihost.py', '-k', 'reward_model_and_rl'), 'multihost'),
    Mutation('dpo_every_process_feeds_all_pairs', 'experiments/dpo.py',
             "{k: v[idx[rows]] for k, v", "{k: v[idx] for k, v",
             ('tests/test_multihost.py', '-k', 'sft_and_dpo'), 'multihost'),
    # --- RLHF methods study: Gao et al. fits, best-of-n estimate, matched budgets ---------
    Mutation('gao_rl_form_without_d', 'research/overoptimization.py',
             "-np.where(d > 0, d * np.log(safe), 0.0)", "-np.where(d > 0, np.log(safe), 0.0)",
             ('tests/test_overoptimization.py',), 'rlhf_study'),
    Mutation('gao_rl_peak_off', 'research/overoptimization.py',
             "np.exp(min(alpha / beta - 1.0, 700.0))", "np.exp(min(alpha / beta, 700.0))",
             ('tests/test_overoptimization.py', '-k', 'peak'), 'rlhf_study'),
    Mutation('bootstrap_never_resamples', 'research/overoptimization.py',
             "pick = rng.integers(0, len(curves), len(curves))", "pick = np.arange(len(curves))",
             ('tests/test_overoptimization.py', '-k', 'bootstrap'), 'rlhf_study'),
    Mutation('best_of_n_expected_weights_off', 'research/rl_tasks.py',
             "w_K = np.asarray([math.comb(i - 1, n - 1)", "w_K = np.asarray([math.comb(i, n - 1)",
             ('tests/test_compare_rlhf.py', '-k', 'best_of_n_expected'), 'rlhf_study'),
    Mutation('rlhf_study_budget_unchecked', 'experiments/compare_rlhf.py',
             "  if len(set(counts.values())) > 1:", "  if False:",
             ('tests/test_compare_rlhf.py', '-k', 'budgets'), 'rlhf_study'),
    Mutation('checkpoints_without_config_resumed', 'experiments/common.py',
             "  if (path / 'checkpoints').is_dir() and not (path / 'config.json').exists():",
             "  if False:",
             ('tests/test_bad_inputs.py', '-k', 'checkpoints_without'), 'bad_input'),
    # --- limitations study: tool parts ----------------------------------------------------
    Mutation('world_search_no_exact_name', 'research/limitations_tools.py',
             "if search_lib.words(h.title) == wanted]", "]",
             ('tests/test_limitations_tools.py', '-k', 'world_search'), 'limitations'),
    Mutation('role_reward_ignores_the_end', 'research/limitations_tools.py',
             "jnp.any(words_BxS & stops_BxS & ends_BxS, axis=1)",
             "jnp.any(words_BxS & stops_BxS, axis=1)",
             ('tests/test_limitations_tools.py', '-k', 'role_sentence_reward'), 'limitations'),
    Mutation('role_reward_pays_any_short_close', 'research/limitations_tools.py',
             "jnp.any(words_BxS & stops_BxS & ends_BxS, axis=1)",
             "jnp.any(stops_BxS & (valid.sum(axis=1)[:, None] <= 4), axis=1)",
             ('tests/test_limitations_tools.py', '-k', 'role_sentence_reward'), 'limitations'),
    Mutation('think_arms_at_the_study_size', 'experiments/limitations.py',
             "return dict(config, model=dict(config['model'], **config['think'].get('model', {})))",
             "return dict(config)",
             ('tests/test_limitations.py', '-k', 'think_arms'), 'limitations'),
    Mutation('decimals_compared_as_strings', 'research/limitations_tools.py',
             "return a if float(a) > float(b) else b", "return a if a > b else b",
             ('tests/test_limitations_tools.py', '-k', 'decimals'), 'limitations'),
    Mutation('after_tools_keeps_end_of_turn', 'research/limitations_probes.py',
             "[t for t in tokens[cut:] if t != EOT]", "tokens[cut:]",
             ('tests/test_limitations_tools.py', '-k', 'after_tools'), 'limitations'),
    Mutation('report_drops_timing', 'experiments/limitations_report.py',
             "                  timing_section):", "                  ):",
             ('tests/test_limitations_tools.py', '-k', 'report'), 'limitations'),
    Mutation('sandbox_leaves_uid_processes', 'research/tools/python_sandbox.py',
             "  if uid is None:\n    return\n  for _ in range(100):",
             "  if True:\n    return\n  for _ in range(100):",
             ('tests/test_tools_hostile.py',), 'tools'),
    Mutation('sandbox_tmp_not_removed', 'research/tools/python_sandbox.py',
             'with tempfile.TemporaryDirectory(prefix=f"tool_python_{os.getpid()}_") as tmp:',
             'with __import__("contextlib").nullcontext(tempfile.mkdtemp(prefix=f"tool_python_{os.getpid()}_")) as tmp:',
             ('tests/test_tools_hostile.py',), 'tools'),
    # --- the pipeline: held-out evaluation, tool data, RL method ---------------------------
    Mutation('pipeline_eval_trained_questions_kept', 'experiments/pipeline_eval.py',
             'kept = [p for p in test if p.question not in seen]', 'kept = list(test)',
             ('tests/test_pipeline.py', '-k', 'heldout_word_problems'), 'held out'),
    Mutation('sft_tool_system_dropped', 'experiments/sft.py',
             "  system = tools_data.calculator_system() if dc.get('tools_in_system') else None",
             '  system = None', ('tests/test_pipeline.py', '-k', 'sft_tool_data'), 'data'),
    Mutation('rl_method_estimator_unset', 'experiments/pipeline.py',
             '    config.rlhf.ppo.advantage = method\n', '',
             ('tests/test_pipeline.py', '-k', 'rl_method'), 'config'),
    Mutation('pipeline_evaluates_on_every_process', 'experiments/pipeline.py',
             "if stage == 'evaluate' and jax.process_count() > 1:",
             "if stage == 'evaluate' and jax.process_count() > 99:",
             ('tests/test_pipeline_processes.py',), 'processes'),
    Mutation('one_process_env_keeps_a_coordinator', 'experiments/common.py',
             "if k not in ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',",
             "if k not in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',",
             ('tests/test_pipeline_processes.py', '-k', 'one_process_environment'), 'processes'),
]


def apply(m: Mutation) -> str:
  """Writes the mutated file; returns the original text (to restore)."""
  path = REPO / m.file
  text = path.read_text()
  count = text.count(m.old)
  if count != 1:
    raise SystemExit(f'mutation {m.name}: the old snippet occurs {count} times in {m.file} '
                     f'(expected exactly once); update the entry')
  path.write_text(text.replace(m.old, m.new))
  return text


def run_tests(tests) -> tuple[int, str]:
  cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *tests]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  return out.returncode, (out.stdout + out.stderr).strip().splitlines()[-1:]


def outcome(returncode: int) -> str:
  return {0: 'survived', 1: 'caught'}.get(returncode, f'error (pytest exit {returncode})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--list', action='store_true', help='list the mutations and exit')
  parser.add_argument('--only', action='append', default=[], metavar='NAME',
                      help='run only this mutation (repeatable)')
  parser.add_argument('--clean', action='store_true',
                      help="first run each mutation's tests on the unmutated code")
  args = parser.parse_args()
  names = [m.name for m in MUTATIONS]
  if len(set(names)) != len(names):
    raise SystemExit('mutation names must be unique')
  unknown = set(args.only) - set(names)
  if unknown:
    raise SystemExit(f'unknown mutation(s) {sorted(unknown)}; see --list')
  chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
  if args.list:
    for m in chosen:
      print(f'{m.name:36s} {m.kind:12s} {m.file:28s} {" ".join(m.tests)}')
    return 0
  for m in chosen:  # fail before running anything if an entry is stale
    count = (REPO / m.file).read_text().count(m.old)
    if count != 1:
      raise SystemExit(f'mutation {m.name}: the old snippet occurs {count} times in {m.file}')

  rows, start = [], time.time()
  for m in chosen:
    if args.clean:
      code, tail = run_tests(m.tests)
      if code != 0:
        print(f'{m.name}: its tests fail on the unmutated code: {tail}', flush=True)
        rows.append((m, 'error (fails unmutated)', 0.0))
        continue
    t0 = time.time()
    original = apply(m)
    try:
      code, tail = run_tests(m.tests)
    finally:
      (REPO / m.file).write_text(original)
    result = outcome(code)
    rows.append((m, result, time.time() - t0))
    print(f'{m.name:36s} {result:10s} {time.time() - t0:6.1f}s  {" ".join(tail)}', flush=True)

  print()
  print(f'{"mutation":36s} {"kind":12s} {"result":10s} {"seconds":>7s}')
  for m, result, seconds in rows:
    print(f'{m.name:36s} {m.kind:12s} {result:10s} {seconds:7.1f}')
  caught = sum(r == 'caught' for _, r, _ in rows)
  survived = sum(r == 'survived' for _, r, _ in rows)
  errors = len(rows) - caught - survived
  print(f'\ncaught {caught}/{len(rows)}, survived {survived}, errors {errors}; '
        f'{time.time() - start:.0f}s')
  return 0 if caught == len(rows) else 1


if __name__ == '__main__':
  sys.exit(main())
