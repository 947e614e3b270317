# Weight quantization and its comparison.
#   quantize           GPTQ / AWQ / round-to-nearest with llm-compressor, LLM.int8 / NF4 with bitsandbytes
#   quantize_gptqmodel GPTQ with GPTQModel (recipes with `backend: gptqmodel`; its own env, CUDA only)
#   quantize_compare   recipes of stage quantize_compare: one table (markdown + CSV) and a plot over the quantized
#                      variants (the rule is not named quant_compare: that is the recipe's own target rule)
from quantune.quantize import backend_of


use rule stage_step as quantize with:
    input:
        model=lambda w: model_input(w.name),
        calibration=lambda w: (
            dataset_input(w.name, "calibration_dataset") if "calibration_dataset" in RECIPES[w.name] else []
        ),
        eval=lambda w: dataset_input(w.name, "eval_dataset"),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("quantize", lambda r: backend_of(r) != "gptqmodel"),
    conda:
        f"{ENVS}/quantize.yaml"
    container:
        image_of("quantize")
    # tiny: two CPU jobs side by side on 2 cores (Snakemake sets OMP_NUM_THREADS to the rule's threads)
    threads: lambda w: 1 if SCALE == "tiny" else 8
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else int(RECIPES[w.name].get("mem_mb", 64000)),
        runtime=lambda w: 30 if SCALE == "tiny" else 240,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="quantize",


use rule quantize as quantize_gptqmodel with:
    wildcard_constraints:
        name=names_of("quantize", lambda r: backend_of(r) == "gptqmodel"),
    conda:
        f"{ENVS}/gptqmodel.yaml"
    container:
        image_of("gptqmodel")
    threads: 8
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else int(RECIPES[w.name].get("mem_mb", 64000)),
        runtime=lambda w: 30 if SCALE == "tiny" else 240,
        gpu=lambda w: max(1, gpu_count(w.name)),


use rule stage_step as quantize_compare with:
    input:
        metrics=lambda w: read_targets(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        report(
            f"{RES}/{{name}}/metrics.json",
            caption="../report/metrics.rst",
            category="metrics",
            labels={"target": "{name}"},
        ),
        f"{RES}/{{name}}/compare.md",
        report(
            f"{RES}/{{name}}/compare.csv",
            caption="../report/compare.rst",
            category="comparisons",
            labels={"target": "{name}", "file": "table"},
        ),
        report(
            f"{RES}/{{name}}/compare.png",
            caption="../report/compare.rst",
            category="comparisons",
            labels={"target": "{name}", "file": "plot"},
        ),
    wildcard_constraints:
        name=names_of("quantize_compare"),
    conda:
        f"{ENVS}/quantize.yaml"
    container:
        image_of("quantize")
    threads: 1
    params:
        step="quantize_compare",
