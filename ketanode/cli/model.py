"""``ketanode model ...``: train, evaluate, synthesise cohorts, registry. Thin: parse, call, print.

Added to the main app in ``ketanode/cli/main.py`` with ``app.add_typer(model_app, name="model")``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ketanode.cli.common import JsonOpt, console, engine_for, err
from ketanode.cli.common import settings_of as _settings
from ketanode.config import Settings
from ketanode.texts import DEMO_LABEL, RESEARCH_USE_ONLY

model_app = typer.Typer(
    help=f"Train, validate and manage ketamine-response models. {RESEARCH_USE_ONLY}.",
    no_args_is_help=True,
)
logger = logging.getLogger(__name__)

JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")]
CacheOpt = Annotated[
    Path | None,
    typer.Option(help="Feature cache folder (default: <pipeline.work_dir>/feature-cache)."),
]


def _engine(settings: Settings) -> Any:
    return engine_for(settings)


def _cache(settings: Settings, cache: Path | None) -> Path:
    return cache if cache is not None else settings.pipeline.work_dir / "feature-cache"


def _table(csv_path: Path, settings: Settings, cache: Path | None, jobs: int) -> Any:
    from ketanode.model.cohort import CohortError, extract_features, read_cohort

    try:
        subjects = read_cohort(csv_path)
    except (CohortError, OSError) as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc
    try:
        table = extract_features(
            subjects, settings=settings.pipeline, cache_dir=_cache(settings, cache), n_jobs=jobs
        )
    except CohortError as exc:  # e.g. one image under two subject IDs
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from exc
    console.print(
        f"features: {len(subjects)} subjects, {table.from_cache} from cache, "
        f"{table.computed} computed, {len(table.excluded)} excluded",
        highlight=False,
    )
    for e in table.excluded:
        console.print(f"  [yellow]excluded[/yellow] {e['subject']}: {e['reason']}", highlight=False)
    return table


def _metrics_text(metrics: dict[str, Any], title: str = "cross-validated metrics (95% CI)") -> None:
    table = Table(title=title)
    for col in ("metric", "estimate", "95% CI"):
        table.add_column(col)
    for name, m in metrics.items():
        table.add_row(name, f"{m['mean']:.3f}", f"{m['ci95'][0]:.3f} - {m['ci95'][1]:.3f}")
    console.print(table)


def _refused(exc: Exception) -> typer.Exit:
    err.print(f"[red]{exc}[/red]", highlight=False)
    return typer.Exit(1)


@model_app.command("train")
def train_cmd(
    ctx: typer.Context,
    cohort: Annotated[Path, typer.Argument(help="Cohort CSV (subject, path|features, label).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (.skops).")] = Path(
        "model.skops"
    ),
    name: Annotated[str | None, typer.Option(help="Model name (default: file stem).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Outer CV repeats.")] = 10,
    folds: Annotated[int, typer.Option(min=2, help="Outer CV folds.")] = 5,
    inner_folds: Annotated[int, typer.Option(min=2, help="Inner CV folds (C).")] = 5,
    permutations: Annotated[
        int,
        typer.Option(
            min=0,
            help="Label permutations (within site) of the whole nested CV, for the p-value of "
            "the headline statistic.",
        ),
    ] = 1000,
    tiv: Annotated[str, typer.Option(help="proportion | regress | none")] = "proportion",
    baseline: Annotated[
        bool,
        typer.Option(help="Covariates-only baseline (age, sex, site) under the same nested CV."),
    ] = True,
    adjust: Annotated[
        str,
        typer.Option(
            help="Sensitivity analysis: covariates regressed out of the inputs inside the folds "
            "(e.g. 'age,sex'; empty: none). The saved model stays unadjusted."
        ),
    ] = "",
    harmonise: Annotated[
        bool,
        typer.Option(
            help="Sensitivity analysis: ComBat across sites inside the folds (with --adjust's "
            "covariates kept as biological effects)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Mark the model as trained on synthetic data. A cohort built by `model "
            "synth` (a synthetic.json beside it, or rows marked in its 'synthetic' column) "
            "always makes a synthetic model: there is no flag to unset it.",
        ),
    ] = False,
    register: Annotated[bool, typer.Option(help="Add the model to the registry.")] = True,
    jobs: JobsOpt = 2,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Nested CV, permutation test, final model, report; writes MODEL.skops + MODEL.json."""
    from ketanode.model.training import train
    from ketanode.model.validation import Protocol

    settings = _settings(ctx)
    if tiv not in ("proportion", "regress", "none"):
        raise typer.BadParameter("proportion, regress or none", param_hint="--tiv")
    adjusted = tuple(c.strip() for c in adjust.split(",") if c.strip())
    if any(c not in ("age", "sex") for c in adjusted):
        raise typer.BadParameter("a comma-separated subset of age,sex", param_hint="--adjust")
    table = _table(cohort, settings, cache, jobs)
    from ketanode.synthetic.cohort import is_synthetic_cohort

    is_synth = bool(synthetic) or is_synthetic_cohort(cohort)
    protocol = Protocol(
        folds=folds,
        repeats=repeats,
        inner_folds=inner_folds,
        tiv=tiv,
        seed=seed,
        n_permutations=permutations,
        n_jobs=jobs,
        baseline=baseline,
        adjust=adjusted,
        harmonise=harmonise,
        show_progress=not as_json,
    )
    try:
        meta = train(
            table,
            out,
            protocol=protocol,
            name=name,
            synthetic=is_synth,
            label=DEMO_LABEL if is_synth else None,
            progress=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False),
        )
    except ValueError as exc:
        raise _refused(exc) from exc
    if register:
        from ketanode.model.registry import register as reg

        reg(_engine(settings), out)
    if as_json:
        print(json.dumps(meta, indent=2, default=str))
        return
    val = meta["validation"]
    console.print(f"[bold]{meta['label']}[/bold]", highlight=False)
    _metrics_text(val["metrics"])
    if val.get("permutation"):
        pm = val["permutation"]
        console.print(
            f"permutation test of the headline ({pm['statistic']}): p = {pm['p_value']} "
            f"({pm['n_permutations']} permutations, {pm['shuffled']})",
            highlight=False,
        )
    _covariates_text(val)
    if (val.get("final_c") or {}).get("note"):
        console.print(f"[yellow]{val['final_c']['note']}[/yellow]", highlight=False)
    lso = val.get("leave_site_out") or {}
    if lso.get("skipped"):
        console.print(f"[yellow]{lso['skipped']}[/yellow]", highlight=False)
    elif lso.get("pooled"):
        pooled = lso["pooled"]
        perm = pooled.get("permutation") or {}
        console.print(
            f"leave-site-out (pooled): balanced accuracy {pooled['balanced_accuracy']} "
            f"(95% CI {pooled['balanced_accuracy_ci95']}), AUC {pooled['auc']}"
            + (f", permutation p = {perm['p_value']}" if perm else ""),
            highlight=False,
        )
    console.print(f"model: {out} (sha256 {meta['sha256']})\nreport: {meta['report']}")


def _covariates_text(val: dict[str, Any]) -> None:
    cov = val.get("covariates") or {}
    base = cov.get("baseline") or {}
    adj = cov.get("adjusted") or {}
    if base.get("skipped"):
        console.print(f"covariates-only baseline not run: {base['skipped']}", highlight=False)
    elif base:
        _ba_line(f"covariates-only baseline ({', '.join(base['covariates'])})", base)
        console.print(f"[bold]{base['verdict']}[/bold]", highlight=False)
    if adj.get("skipped"):
        console.print(f"adjusted analysis not run: {adj['skipped']}", highlight=False)
    elif adj:
        _ba_line(f"adjusted ({'; '.join(adj['steps'])})", adj)


def _ba_line(label: str, analysis: dict[str, Any]) -> None:
    ba = analysis["metrics"]["balanced_accuracy"]
    console.print(
        f"{label}: balanced accuracy {ba['mean']:.3f} ({ba['ci95'][0]:.3f} - {ba['ci95'][1]:.3f})",
        highlight=False,
    )


@model_app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file (.skops).")],
    cohort: Annotated[Path, typer.Argument(help="Cohort CSV.")],
    out_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the report and predictions (default: the model's folder)."),
    ] = None,
    seed: int = 0,
    jobs: JobsOpt = 2,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """External validation of a saved model on a new cohort (same metrics, same report)."""
    from ketanode.model.files import ModelRefused
    from ketanode.model.training import evaluate

    settings = _settings(ctx)
    table = _table(cohort, settings, cache, jobs)
    try:
        result = evaluate(model, table, seed=seed, out_dir=out_dir)
    except (ModelRefused, FileNotFoundError) as exc:
        raise _refused(exc) from exc
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    console.print(f"[bold]{result['label']}[/bold]", highlight=False)
    _metrics_text(result["metrics"], "external validation metrics (95% CI, fixed model)")
    console.print(f"permutation p = {result['permutation']['p_value']}")
    cal = result.get("calibration") or {}
    if cal.get("brier") is not None:
        console.print(
            f"calibration: Brier {cal['brier']} (base rate alone {cal['brier_of_base_rate']}), "
            f"intercept {cal['intercept']} (ideal 0), slope {cal['slope']} (ideal 1)",
            highlight=False,
        )
    arms = result.get("arms") or {}
    if arms.get("skipped"):
        console.print(f"[yellow]arms not analysed: {arms['skipped']}[/yellow]", highlight=False)
    elif arms:
        for name, a in arms["per_arm"].items():
            if "metrics" in a:
                ba = a["metrics"]["balanced_accuracy"]
                console.print(
                    f"arm {name} (n={a['n']}): balanced accuracy {ba['mean']:.3f} "
                    f"({ba['ci95'][0]:.3f} - {ba['ci95'][1]:.3f}), p = {a['permutation_p']}",
                    highlight=False,
                )
            else:
                console.print(f"arm {name}: {a.get('skipped')}", highlight=False)
        inter = arms["interaction"]
        if "p_value" in inter:
            console.print(
                f"arm x prediction interaction: b3 = "
                f"{inter['coefficients']['b3_interaction']}, {inter['test']}: "
                f"p = {inter['p_value']}",
                highlight=False,
            )
        else:
            console.print(f"interaction not tested: {inter.get('skipped')}", highlight=False)
    console.print(f"predictions: {result['predictions']}\nreport: {result['report']}")


@model_app.command("predict")
def predict_cmd(
    ctx: typer.Context,
    scan: Annotated[Path, typer.Argument(help="A NIfTI file or a DICOM series folder.")],
    model: Annotated[
        Path | None, typer.Option(help="Model file (default: the registry's active model).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure one scan and print the model's prediction (with the model's label)."""
    from ketanode.model.classifier import predict
    from ketanode.model.cohort import Subject, extract_features
    from ketanode.model.files import ModelRefused, load_model
    from ketanode.model.registry import RegistryError, load_active

    settings = _settings(ctx)
    try:
        loaded = load_model(model) if model else load_active(_engine(settings))
    except (ModelRefused, RegistryError, FileNotFoundError) as exc:
        raise _refused(exc) from exc
    table = extract_features([Subject("scan", 0, path=scan)], settings=settings.pipeline)
    if table.excluded:
        err.print(f"[red]not measured: {table.excluded[0]['reason']}[/red]", highlight=False)
        raise typer.Exit(1)
    result = predict(loaded.model, table.X)[0] | {
        "model_sha256": loaded.sha256,
        "label": loaded.label,
        "synthetic_model": loaded.synthetic,
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"[bold red]{loaded.label}[/bold red]", highlight=False)
    console.print(
        f"{result['predicted_class']}: probability of response {result['probability']:.2f}, "
        f"decision value {result['decision_value']:+.3f}",
        highlight=False,
    )


@model_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Folder for images/, cohort.csv, synthetic.json.")],
    n: Annotated[int, typer.Option(min=4, help="Subjects.")] = 40,
    responder_rate: Annotated[float, typer.Option(help="Fraction of responders.")] = 0.5,
    effect_d: Annotated[float, typer.Option(help="Planted effect size (Cohen's d).")] = 1.5,
    null: Annotated[bool, typer.Option(help="Labels independent of the images.")] = False,
    seed: int = 0,
    voxel: Annotated[float, typer.Option(help="Isotropic voxel size (mm).")] = 3.0,
    region_sd: Annotated[float, typer.Option(help="Between-subject SD of log regional GM.")] = 0.08,
    sites: Annotated[int, typer.Option(min=1, help="Simulated sites (scanner SNR).")] = 1,
    fmt: Annotated[str, typer.Option("--format", help="nifti | dicom")] = "nifti",
    arms: Annotated[
        int, typer.Option(min=1, max=2, help="Treatment arms (2: ketamine and saline).")
    ] = 1,
    effect_in: Annotated[
        str, typer.Option(help="all | ketamine (with --arms 2: saline labels unrelated).")
    ] = "all",
    age_effect: Annotated[
        float, typer.Option(help="Years by which responder-like subjects are older.")
    ] = 0.0,
    age_gm_slope: Annotated[
        float, typer.Option(help="Log GM change per year of age in every region (e.g. -0.005).")
    ] = 0.0,
    features_only: Annotated[
        bool,
        typer.Option(help="Write precomputed features (feature-level model, no images; seconds)."),
    ] = False,
    jobs: JobsOpt = 2,
) -> None:
    """Write a synthetic cohort of phantom images with the study's direction planted."""
    from ketanode.synthetic.cohort import SyntheticCohort, write_cohort, write_feature_cohort

    if fmt not in ("nifti", "dicom"):
        raise typer.BadParameter("nifti or dicom", param_hint="--format")
    if effect_in not in ("all", "ketamine"):
        raise typer.BadParameter("all or ketamine", param_hint="--effect-in")
    if effect_in == "ketamine" and arms != 2:
        raise typer.BadParameter("--effect-in ketamine needs --arms 2", param_hint="--effect-in")
    cfg = SyntheticCohort(
        n=n,
        responder_rate=responder_rate,
        effect_d=effect_d,
        seed=seed,
        null=null,
        voxel_mm=voxel,
        region_sd=region_sd,
        sites=sites,
        fmt="dicom" if fmt == "dicom" else "nifti",
        arms=arms,
        effect_in="ketamine" if effect_in == "ketamine" else "all",
        age_effect_years=age_effect,
        age_gm_slope=age_gm_slope,
    )
    if features_only:
        path = write_feature_cohort(cfg, out)
        console.print(f"synthetic feature cohort: {path} ({n} subjects, no images)")
        return
    path = write_cohort(cfg, out, n_jobs=jobs)
    console.print(f"synthetic cohort: {path} ({n} subjects)")


@model_app.command("list")
def list_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Registered models (the active one marked)."""
    from ketanode.model.registry import list_models

    rows = list_models(_engine(_settings(ctx)))
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="models")
    cols = ("active", "sha256", "name", "synthetic", "cv_balanced_accuracy", "created_at", "label")
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(
            *[
                ("*" if r[c] else "")
                if c == "active"
                else r[c][:12]
                if c == "sha256"
                else ""
                if r[c] is None
                else str(r[c])
                for c in cols
            ]
        )
    console.print(table)


@model_app.command("activate")
def activate_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="SHA-256 (or a unique prefix) or a .skops file.")],
    as_json: JsonOpt = False,
) -> None:
    """Make a model the active one (the file is checked again first)."""
    from ketanode.model.files import ModelRefused
    from ketanode.model.registry import RegistryError, activate

    try:
        row = activate(_engine(_settings(ctx)), ref)
    except (ModelRefused, RegistryError, FileNotFoundError) as exc:
        raise _refused(exc) from exc
    if as_json:
        print(json.dumps(row, indent=2, default=str))
        return
    console.print(f"active model: {row['name']} ({row['sha256'][:12]})", highlight=False)
    if row["synthetic"]:
        console.print(f"[bold red]{row['label']}[/bold red]", highlight=False)


@model_app.command("demo-train")
def demo_train_cmd(
    work: Annotated[Path, typer.Option(help="Folder for the cohort and feature cache.")] = Path(
        "ketanode-data/demo-cohort"
    ),
    out: Annotated[Path | None, typer.Option(help="Model file (default: the package's).")] = None,
    jobs: JobsOpt = 2,
) -> None:
    """Regenerate the demonstration model (seeded synthetic cohort; see its README)."""
    from ketanode.synthetic.demo_model import DEMO_MODEL, make_demo_model

    meta = make_demo_model(
        work,
        out or DEMO_MODEL,
        n_jobs=jobs,
        progress=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False),
    )
    console.print(f"[bold red]{meta['label']}[/bold red]", highlight=False)
    _metrics_text(meta["validation"]["metrics"])
    console.print(f"model: {out or DEMO_MODEL} (sha256 {meta['sha256']}), {meta['seconds']}")
