# The report: results/REPORT.md and one self-contained HTML page (results/report/index.html) from
# whatever is built, plus an optional TensorBoard screenshot.
#
# `report` takes no target as input, on purpose: it scans results/ and reports what exists, so
# `snakemake report` never builds, rebuilds or waits for a target. (Naming the targets' metrics.json files as
# inputs would make Snakemake rebuild every target whose code, params or inputs changed since it was built:
# asking for a report must not retrain a model.) Targets that are not built are listed as "not built".
# Its one input is results/report/.inputs.sha1, a digest of the path, size and mtime of every file the report
# reads under results/ (metrics.json, a target's own plots and tables, TensorBoard events), rewritten only
# when the digest changes, and only when the report is asked for (an input function runs while the DAG is
# built): so the report reruns by itself, on Snakemake's mtime trigger, whenever a target is built, rebuilt
# or removed, and is up to date otherwise. Build targets first, then the report:
#   snakemake --cores 2 eval_opt67b qlora_compare && snakemake --cores 2 report
rule report:
    input:
        stamp=lambda w: _report_inputs_file(),
    output:
        md=f"{RES}/REPORT.md",
        html=f"{RES}/report/index.html",
        figures=directory(f"{RES}/report/figures"),
    log:
        f"{RES}/logs/report.log",
    benchmark:
        f"{RES}/benchmarks/report.tsv"
    conda:
        f"{ENVS}/report.yaml"
    container:
        image_of("report")
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        results=lambda w, output: str(Path(output.md).parent),
        scale=SCALE,
        stages=json.dumps({n: r["stage"] for n, r in sorted(RECIPES.items())}, sort_keys=True),
        png=f"{RES}/report/tensorboard.png",
    shell:
        "python -m quantune.report build --results {params.results} --scale {params.scale} --recipe-stages {params.stages:q} --md {output.md}"
        " --html {output.html} --figures {output.figures} --tensorboard-png {params.png} > {log} 2>&1"


# A screenshot of TensorBoard's time-series view (headless Chromium on localhost), which the report embeds
# when it exists. Needs Debian's chromium + chromium-driver and selenium (scripts/install_browser.sh).
# Tiny scale: the tiny OPT pretraining run; full scale: every run under results/full. No target inputs, as
# above; `--forcerun tensorboard_screenshot` takes a new one.
rule tensorboard_screenshot:
    output:
        f"{RES}/report/tensorboard.png",
    log:
        f"{RES}/logs/tensorboard_screenshot.log",
    benchmark:
        f"{RES}/benchmarks/tensorboard_screenshot.tsv"
    conda:
        f"{ENVS}/report.yaml"
    container:
        image_of("report")
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        logdir=lambda w, output: str(Path(output[0]).parent.parent),
        run="^tiny_world/models/opt/tb$" if SCALE == "tiny" else ".*",
    shell:
        "python -m quantune.report tensorboard-screenshot --logdir {params.logdir} --run {params.run:q}"
        " --out {output} > {log} 2>&1"
