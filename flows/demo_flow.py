"""The `portrait_demo` Prefect flow: the whole system on the bundled sample, in one command.

prepare (the sample, served over loopback as VoxCeleb-style metadata) -> train (a small model for
a bounded number of steps on Ray Train) -> edit (sample videos with sound, through the Ray Data
editing job) -> one HTML report. Each stage is the job's own flow, run as a subflow with the same
parameters a user would give it, so a rerun reuses what is done: the dataset resumes, the training
run resumes (and stops at once when it already has its steps), finished edits are skipped.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from flows.commands.demo import DemoSettings
from flows.edit_flow import edit_videos
from flows.prepare_flow import prepare_dataset
from flows.train_flow import train_model
from pipelines.options import build

_DEFAULTS = DemoSettings()
DEMO_TO_RGB_LR_MUL = 10.0
"""The demo's narrow 1x1 to-RGB convs learn 10x faster than the rest (README, training recipe)."""
DEMO_EMA_DECAY = 0.99
"""The demo evaluates and edits with this average of its generator: it smooths the fast to-RGB rate's swings."""
DEMO_LR_DECAY = 1 / 3
"""The demo's rates fall to a tenth over the last third of its steps."""
DEMO_FACE_FOCUS = 16.0
"""The demo's L1 and sharpness terms weigh the inner face up to 17x the corners: eyes sharp enough to detect."""

TOY_MODEL_NOTE = ("The model in this report was trained for minutes on one short clip: it shows that the "
                  "pipeline works end to end (data, training, editing, timing, sound, paste-back), not what DPE "
                  "can do. Run `portrait demo --checkpoint dpe.pt` to edit with the official weights.")


@flow(name="portrait_demo", log_prints=True)
def portrait_demo(output: str = _DEFAULTS.output, checkpoint: str | None = _DEFAULTS.checkpoint,
                  steps: int = _DEFAULTS.steps, size: int = _DEFAULTS.size, workers: int = _DEFAULTS.workers,
                  batch: int = _DEFAULTS.batch, jobs: int | None = _DEFAULTS.jobs) -> dict:
    """Prepare the sample, train a small model (unless `checkpoint` is given), edit the demo videos
    with it (the first `jobs` of them; all when None), and write `<output>/report/index.html`."""
    settings = build(DemoSettings, locals())
    from pipelines.dataset.inspect import write_contact_sheet
    from pipelines.report.page import ReportInputs, write_report
    from pipelines.sample.demo import make_demo_media

    log = get_run_logger()
    root, checkpoint = Path(settings.output), settings.checkpoint
    dataset, runs, edited = root / "dataset", root / "runs", root / "edited"
    log.info("[1/4] preparing the sample dataset into %s", dataset)
    prepared = prepare_dataset(output=str(dataset), sample=True, workdir=str(root / "work"))
    if not prepared.get("ok"):
        raise RuntimeError(f"the sample dataset has no prepared clip; see {dataset}/manifest.parquet")
    write_contact_sheet(str(dataset))
    run = None
    if checkpoint is None:
        log.info("[2/4] training a %d px model for %d steps on %d Ray Train worker(s)", size, steps, workers)
        # Reconstruction alone (no GAN, README "Training recipe"): at this scale, without the VGG term,
        # the adversarial term outweighs L1 and the held-out error rises after ~50 steps. The sharpness term
        # (the default without VGG), faster to-RGB convs and flows held at the identity for the first third
        # make the renderer copy the source's detail before motion is learnt: faces, not blurred blobs. The
        # fast to-RGB rate swings from step to step: the rates decay over the last third and the report and
        # the edits use the generator's moving average. L1 and sharpness weigh the inner face more, so the
        # few pixels of each eye are not washed into the skin.
        trained = train_model(data=str(dataset), run_dir=str(runs), name="demo", steps=steps, size=size,
                              workers=workers, batch=batch, gan_start=steps, flow_warmup=steps // 3,
                              to_rgb_lr_mul=DEMO_TO_RGB_LR_MUL, ema_decay=DEMO_EMA_DECAY,
                              lr_decay=DEMO_LR_DECAY, face_focus=DEMO_FACE_FOCUS,
                              checkpoint_every=max(10, steps // 3),
                              grid_every=max(10, steps // 3), eval_every=max(10, steps // 3), log_every=5)
        checkpoint, run = trained["checkpoint"], str(runs / "demo")
    else:
        log.info("[2/4] training skipped: editing with %s", checkpoint)
    media = make_demo_media(root / "media")
    table = media["jobs.csv"]
    if jobs is not None:
        lines = table.read_text().splitlines()
        table = root / "media" / f"jobs-{jobs}.csv"
        table.write_text("\n".join(lines[: jobs + 1]) + "\n")
    log.info("[3/4] editing the demo videos with %s into %s", checkpoint, edited)
    edits = edit_videos(jobs=str(table), checkpoint=str(checkpoint), output=str(edited), previews=True,
                        preview_seconds=60.0, workdir=str(root / "work" / "edit"))
    log.info("[4/4] writing the report")
    index = write_report(ReportInputs(dataset=str(dataset), run=run, edits=str(edited), note=TOY_MODEL_NOTE if run
                                      else ""), root / "report")
    print(f"report: {index}")
    return {"report": str(index), "dataset": prepared, "checkpoint": str(checkpoint), "edits": edits}
