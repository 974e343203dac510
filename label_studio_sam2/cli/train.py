"""`label-studio-sam2 train`: fine-tune a project's decoder on its annotations, roll back, list runs."""

from __future__ import annotations

import sys

from label_studio_sam2.cli.options import model_settings, stop_on_signals
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions
from label_studio_sam2.labelstudio.api import LabelStudioAPI, LabelStudioAPIError, describe
from label_studio_sam2.labelstudio.runtime import runtime_for
from label_studio_sam2.labelstudio.train import train_project
from label_studio_sam2.service.errors import BackendError
from label_studio_sam2.service.logs import setup_logging
from label_studio_sam2.service.settings import Settings
from label_studio_sam2.service.trainlock import TrainingBusy, training_slot
from label_studio_sam2.service.trainruns import end_run, read_runs, runs_table, start_run, versions_table


def cmd_train(args) -> None:
    overrides = dict(
        **model_settings(args),
        label_studio_url=args.url,
        label_studio_api_key=args.api_key,
        store_dir=args.store,
        finetune_dir=args.dir,
        finetune_epochs=args.epochs,
        finetune_lr=args.lr,
        finetune_min_gain=args.min_gain,
    )
    settings = Settings.from_env(**overrides)
    setup_logging(settings)
    versions = DecoderVersions(settings.finetune_dir, args.project)
    if args.rollback:
        previous = versions.rollback()
        print(
            f"project {args.project} now uses {previous or 'the base model'} (servers pick it up within a minute)"
        )
        return
    if args.list or args.status:
        print_runs(versions, args.project, runs=args.status, listing=args.list)
        return
    if not settings.label_studio_url or not settings.label_studio_api_key:
        sys.exit("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key) to reach Label Studio")
    slot = training_slot(versions.dir.parent, args.project, settings.max_trainings)
    try:  # one run per project, MAX_TRAININGS at once: across processes (the server's too)
        slot.__enter__()
    except TrainingBusy as e:
        sys.exit(f"train: {e.message}")
    try:
        _run(settings, args, versions)
    finally:
        slot.__exit__(None, None, None)


def _run(settings: Settings, args, versions: DecoderVersions) -> None:
    """One run, recorded in runs.json from its start to its end (`train --status`, the server's
    report); prints the run's report and exits with its code."""
    stop = stop_on_signals("step")
    run = start_run(versions.dir, settings.model)
    error = None
    try:
        runtime = runtime_for(settings, load_in_background=False)
        runtime.load()
        segmenter = runtime.require(0)
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
        report = train_project(
            api, args.project, segmenter, settings, val_fraction=args.val_fraction, stop=stop
        )
    except BackendError as e:
        error = f"train: {e.message}"
    except LabelStudioAPIError as e:
        error = f"train: {e}"
    except BaseException as e:
        if type(e).__name__ == "ApiError":
            error = f"train: Label Studio: {describe(e)}"
        else:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            end_run(
                versions.dir,
                run,
                "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                error=reason,
            )
            raise
    if error is not None:
        end_run(versions.dir, run, "failed", error=error.removeprefix("train: "))
        sys.exit(error)
    state = "interrupted" if report.interrupted else "finished"
    end_run(versions.dir, run, state, **report.outcome())
    print("\n".join(report.lines()), flush=True)
    sys.exit(report.exit_code)


def print_runs(versions: DecoderVersions, project: int, *, runs: bool, listing: bool) -> None:
    """`train --status`: the running and the last runs; `--list`: the versions and their scores."""
    if runs:
        recorded = read_runs(versions.dir)
        print(f"project {project}: fine-tuning runs ({versions.dir})")
        print(
            runs_table(recorded)
            if recorded
            else "  none yet: `train --project N` or Start Training in Label Studio"
        )
    if listing:
        if runs:
            print()
        names = versions.versions()
        active = versions.active()
        print(f"project {project}: versions ({versions.dir}); served: {active or 'the base model'}")
        if names:
            print(versions_table(names, {v: versions.manifest(v) for v in names}, active))
        else:
            print("  none yet")
