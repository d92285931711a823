"""Shared fixtures: a small generated log on disk, and a launcher for multi-process gloo tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from torchrec_mtl.data import synthetic_text
from torchrec_mtl.data.synthetic import SyntheticConfig, generate

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The two tiers. A bare `pytest` runs the unit tier (pyproject's addopts: -m "not e2e"), in under a minute on 2 cores;
# `pytest -m e2e` runs the end-to-end tier; tools/test.sh (the README's command, and CI's) runs both.
# A test is e2e when it trains a model (run_job, the train stage, or the sharded training pipeline), runs a whole CLI
# stage on a trained run, starts processes, or takes more than about a second; a module- or session-scoped fixture
# that trains counts for every test that uses it. Listed here rather than marked in the files: whole files by name,
# and "file::test function" (every parametrization of it) where a file holds both tiers.
E2E_FILES = {
    "test_bench_train.py",  # the benchmark through the CLI, with worker processes
    "test_bench_towers.py",  # the tower benchmark at smoke size (its tools' imports and steps: seconds)
    "test_checkpoint.py",  # runs killed and resumed, world sizes 1 and 2
    "test_compare_peers.py",  # tools/compare_peers.py's exported rows against a trained run's
    "test_cli_stages.py",  # train, evaluate, predict, export, report on one trained run
    "test_device_runs.py",  # train, evaluate, predict, export on cpu:0, in bf16 and fp16, and on a GPU
    "test_distributed.py",  # two gloo processes per sharding type
    "test_job.py",  # whole training jobs
    "test_lists_e2e.py",  # a model with pooled list features trained through the CLI
    "test_sequence_e2e.py",  # a model with sequence features trained, evaluated and fine-tuned through the CLI
    "test_rank_faults.py",  # faults inside training, at world sizes 1 and 2
    "test_shipped_configs.py",  # the Ali-CCP and AliExpress configs, trained through the CLI
    "test_tune.py",  # studies of whole training runs
    "test_gate_dynamics.py",  # two training runs on the Ali-CCP sample
    "test_learnable_ceiling.py",  # the tool fits six small models
    "test_serving_export.py",  # serve.pt of a trained run against predict, loaded in a bare process
    "test_pruning_export.py",  # pruned exports of a trained run against the unpruned model, in a bare process
}
E2E_TESTS = {
    # a trained checkpoint (module fixture `run`), and a check across two processes
    # tools/bench_peers.py's smoke run: its timed contenders, each a process of its own (the peers only with a venv)
    "test_bench_peers.py::test_the_smoke_run_reports_every_figure_of_ours_and_says_why_the_peers_are_missing",
    "test_bench_peers.py::test_the_smoke_run_with_the_peers_divides_ours_by_the_fastest_peer",
    # tools/compare_history.py trains four tiny runs (two models, two seeds)
    "test_compare_history.py::test_a_tiny_comparison_writes_one_row_per_model_task_and_metric",
    "test_checkpoint_integrity.py::test_every_checkpoint_lists_its_other_files_and_its_rank_files_load_weights_only",
    "test_checkpoint_integrity.py::test_one_flipped_byte_in_any_file_is_refused_by_every_command",
    "test_checkpoint_integrity.py::test_a_pickle_planted_as_a_rank_file_runs_nothing_even_with_a_forged_manifest",
    "test_checkpoint_integrity.py::test_a_pickle_planted_as_dcp_metadata_runs_nothing_even_with_a_forged_manifest",
    "test_checkpoint_integrity.py::test_an_unlisted_a_missing_file_or_no_manifest_is_refused",
    "test_checkpoint_integrity.py::test_a_non_finite_weight_with_a_matching_manifest_is_refused",
    "test_checkpoint_integrity.py::test_an_intact_checkpoint_predicts_and_resumes",
    "test_checkpoint_integrity.py::test_every_rank_refuses_what_one_rank_found",
    # a tiny run with three checkpoints and one of other tasks (module fixture `runs`), evaluated and predicted
    "test_ensemble.py::test_an_ensemble_of_one_checkpoint_is_that_checkpoint_exactly",
    "test_ensemble.py::test_an_ensemble_of_two_checkpoints_scores_the_mean_of_their_predictions",
    "test_ensemble.py::test_a_member_of_other_tasks_is_refused_naming_it_before_anything_is_scored",
    # a model sharded by DMP twice (the per-expert tower's checkpoint, then the expert banks loading it)
    "test_expert_bank.py::test_a_sharded_model_loads_a_per_expert_checkpoint_to_fine_tune_but_not_to_resume",
    "test_finetune.py::test_finetuning_one_task_keeps_the_frozen_parts_and_reports_before_and_after",
    "test_gpu_check.py::test_the_dry_run_runs_every_step_on_the_cpu_and_writes_its_json",  # tools/, 10 commands
    "test_gpu_check.py::test_without_a_gpu_the_check_stops_after_its_first_step_saying_why",
    "test_hostile.py::test_hostile_invocations_end_cleanly_change_nothing_else_and_account_for_every_line",
    "test_item_text.py::test_cached_vectors_sit_in_a_planner_sharded_table_frozen_unless_trainable",
    "test_item_text.py::test_results_report_cold_and_warm_items_with_text",
    "test_item_text.py::test_fine_tuning_trains_the_top_bert_layer_end_to_end_and_nothing_below",
    "test_levers.py::test_fgm_with_epsilon_0_is_the_plain_step_through_the_pipeline",
    "test_levers.py::test_the_levers_train_at_world_size_2_reproducibly",
    "test_plug_in.py::test_mmoe_in_a_dlrm_built_model_trains_under_train_pipeline_sparse_dist",
    # builds the wheel with pip and runs its entry point in a fresh process (about 10 s)
    "test_packaging.py::test_the_wheel_carries_every_module_config_and_the_entry_point_and_lists_its_own_configs",
    # a small sharded model trained three times (fp32, fp16, an overflowing fp16) and a checkpoint
    "test_precision.py::test_fp16_tables_train_with_true_gradients_and_an_overflowing_step_changes_nothing",
    # a trained run (module fixture `run`), and the train stage on Ali-CCP
    "test_predict_inputs.py::test_labelled_empty_label_label_less_and_header_logs_score_the_same_rows_the_same",
    "test_predict_inputs.py::test_the_layouts_encode_to_the_same_model_inputs",
    "test_predict_inputs.py::test_a_log_of_another_layout_is_one_clear_error_before_anything_is_written",
    "test_predict_inputs.py::test_a_line_too_long_is_rejected_without_being_read_whole_and_the_line_numbers_stay_exact",
    "test_predict_inputs.py::test_a_header_csv_of_a_header_schema_scores_with_and_without_its_labels",
    # property tests: unit tests by nature, here for their time (10-20 s each, 1,000+ examples per parser)
    "test_properties.py::test_every_line_of_a_chunk_is_used_or_rejected_with_a_known_reason",
    "test_properties.py::test_every_list_is_kept_cut_to_its_max_length_or_rejected_with_a_list_reason",
    "test_properties.py::test_whole_files_of_random_bytes_are_counted_line_by_line",
    "test_properties.py::test_a_schema_is_accepted_or_refused_naming_its_key",
    "test_properties.py::test_config_overrides_are_accepted_or_refused_naming_the_key",
    "test_reliability.py::test_a_non_finite_loss_stops_training_naming_the_step_and_term_and_keeps_the_last_good_"
    "checkpoint",
    "test_reliability.py::test_when_a_rank_dies_the_others_exit_with_an_error_within_seconds",
    # whole reports with their figures (the report stage; a second or more each)
    "test_report.py::test_the_report_is_one_self_contained_file_with_every_task_and_figure",
    "test_report.py::test_without_predictions_the_prediction_figures_are_notes_and_stale_pngs_go",
    "test_report.py::test_a_tower_without_gates_and_a_task_missing_from_the_curve_get_notes",
    "test_report.py::test_a_task_absent_from_predictions_gets_a_note",
    "test_report.py::test_a_custom_output_path_gets_its_figures_folder_beside_it_and_the_pngs_are_deterministic",
    "test_report.py::test_the_declared_task_kinds_decide_the_tables_and_figures",
    "test_reproducibility.py::test_a_seed_fixes_training_on_one_machine",
    # model selection: trainings of several epochs with validation after each
    "test_selection.py::test_the_selected_epoch_is_the_scan_of_the_curve_and_its_model_is_the_one_tested",
    "test_selection.py::test_training_stops_after_patience_epochs_without_improvement",
    "test_selection.py::test_validating_every_n_steps_trains_the_same_batches_and_adds_points_inside_epochs",
    "test_selection.py::test_patience_counts_points_inside_epochs",
    "test_selection.py::test_validation_rows_can_come_from_files_of_their_own",
    # a trained retrieval run (module fixture `retrieval_run`), and a two-process run
    "test_retrieval.py::test_exported_vectors_give_the_scores_the_model_evaluated",
    "test_retrieval.py::test_cold_items_land_nearer_to_their_planted_category",
    "test_retrieval.py::test_a_two_process_row_wise_run_exports_the_vectors_it_scored_with",
    "test_retrieval.py::test_the_representation_benchmark_scores_the_exported_vectors_and_its_baselines",
    "test_sharding_and_optimizers.py::test_the_schedule_warms_up_then_decays_every_group_from_its_own_rate",
    "test_synthetic.py::test_text_ceiling_replays_the_generator_and_orders_its_ceilings",  # tools/ in a subprocess
    "test_thresholds.py::test_best_f1_threshold_is_chosen_on_held_out_rows_and_scored_on_the_test_rows",
    "test_thresholds.py::test_a_fixed_threshold_scores_the_test_predictions_at_it",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Mark the tests of E2E_FILES and E2E_TESTS e2e; name the entries that match no collected test of their file."""
    unmatched = set(E2E_TESTS)
    collected_files = set()
    for item in items:
        file = item.path.name
        function = getattr(item, "originalname", item.name)
        collected_files.add(file)
        unmatched.discard(f"{file}::{function}")
        if file in E2E_FILES or f"{file}::{function}" in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)
    # a renamed or removed test leaves its entry behind (and a renamed e2e test would land in the unit tier);
    # checked only when whole files were collected
    partial = config.option.keyword or any("::" in arg for arg in config.args)
    stale = sorted(entry for entry in unmatched if entry.split("::")[0] in collected_files)
    if stale and not partial:
        raise pytest.UsageError(
            "tests/conftest.py: E2E_TESTS names tests that are not there (renamed or removed? update the table): "
            + ", ".join(stale)
        )
# The shipped configs hold out a tenth of the training rows and train up to 10 epochs, stopping early on them
# (configs/parts/training.yaml). A test about something else trains one pass on every training row instead: quicker,
# and its row counts stay those of the log.
ONE_PASS = ("training.epochs=1", "training.early_stopping=null", "data.validation_fraction=0")
SMALL = SyntheticConfig(num_rows=40_000, num_users=300, num_items=200, num_brands=40, seed=3)


@pytest.fixture(scope="session", autouse=True)
def host_process_group() -> None:
    """On a machine with CUDA, the tests of this process share a gloo group on the host, opened first: the serving
    commands' default --device is the host, and a process holds one group, so an NCCL group opened by whichever
    test trains first would refuse them. Runs on the GPU go through fresh processes (tests/test_device_runs.py,
    tools/gpu_check.sh). Without CUDA the first init_distributed opens gloo anyway: nothing to do."""
    import torch

    if torch.cuda.is_available():
        from torchrec_mtl.train.distributed import init_distributed

        init_distributed(device=torch.device("cpu"))


@pytest.fixture(scope="session")
def small_log(tmp_path_factory) -> Path:
    """A 40,000-row synthetic log (train, test, items, truth, meta) in a temporary folder."""
    out = tmp_path_factory.mktemp("small_log")
    generate(SMALL, out)
    return out


# The tiny BERT's vocabulary: a few general words and every word the synthetic descriptions use.
WORDS = ["a", "the", "man", "woman", "is", "eating", "food", "meal", "stock", "market", "fell", "rose", "red", "blue",
         "shoes", "book", "cook", "run", "fast", "slow"]  # fmt: skip
WORDS += sorted(
    (
        {
            part
            for group in (
                synthetic_text.CATEGORY_WORDS,
                synthetic_text.APPEAL_WORDS,
                synthetic_text.VALUE_WORDS,
                synthetic_text.PRICE_WORDS,
            )
            for words in group
            for word in words
            for part in word.split()
        }
        | set(synthetic_text.FILLER_WORDS)
    )
    - set(WORDS)
)


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden size 32) with its tokenizer, saved like a user's model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained on the folder reads vocab.txt in both transformers 4 and 5 (in 5 the constructor
    # silently ignores vocab_file=, leaving only the special tokens).
    tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    assert len(tok) == len(vocab), "tiny tokenizer did not pick up its vocab"
    tok.save_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(cfg).eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
