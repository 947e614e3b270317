# Issue 3 (seeds 000 and 001): weight quantization targets and their comparison.
#   quantize           GPTQ / AWQ / round-to-nearest with llm-compressor, LLM.int8 / NF4 with bitsandbytes
#   quantize_gptqmodel GPTQ with GPTQModel (recipes with `backend: gptqmodel`; its own env, CUDA only)
#   quantize_compare   recipes of stage quant_compare: one table (markdown + CSV) and a plot over the quantized
#                      variants (the rule is not named quant_compare: that is the recipe's own target rule)
# Every quantize recipe is checked here, before any job runs (bits the backend supports, keys of another
# method, calibration keys; quant_compare's targets): one line, then Snakemake stops.
from quantune.quantize import backend_of, check_compare_recipe, check_recipe

try:
    for _n in recipes_of("quantize"):
        check_recipe(RECIPES[_n], recipe_path(_n))
    for _n in recipes_of("quant_compare"):
        check_compare_recipe(RECIPES[_n], RECIPES, recipe_path(_n))
except QuantuneError as _e:
    sys.stderr.write(f"quantune: error: {_e}\n")
    sys.exit(1)


rule quantize:
    input:
        model=lambda w: model_input(w.name),
        calibration=lambda w: (
            dataset_input(w.name, "calibration_dataset") if "calibration_dataset" in RECIPES[w.name] else []
        ),
        eval=lambda w: dataset_input(w.name, "eval_dataset"),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(n for n in recipes_of("quantize") if backend_of(RECIPES[n]) != "gptqmodel")
        or "no-quantize-recipes",
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
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        f"{GPU_RUN}python -m quantune.quantize --recipe {{input.recipe}} --out {{params.out}}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule quantize_gptqmodel:
    input:
        model=lambda w: model_input(w.name),
        calibration=lambda w: (
            dataset_input(w.name, "calibration_dataset") if "calibration_dataset" in RECIPES[w.name] else []
        ),
        eval=lambda w: dataset_input(w.name, "eval_dataset"),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(n for n in recipes_of("quantize") if backend_of(RECIPES[n]) == "gptqmodel")
        or "no-quantize_gptqmodel-recipes",
    conda:
        f"{ENVS}/gptqmodel.yaml"
    container:
        image_of("gptqmodel")
    threads: 8
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else int(RECIPES[w.name].get("mem_mb", 64000)),
        runtime=lambda w: 30 if SCALE == "tiny" else 240,
        gpu=lambda w: max(1, gpu_count(w.name)),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        f"{GPU_RUN}python -m quantune.quantize --recipe {{input.recipe}} --out {{params.out}}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule quantize_compare:
    input:
        metrics=lambda w: [f"{RES}/{t}/metrics.json" for t in RECIPES[w.name]["targets"]],
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
        f"{RES}/{{name}}/compare.md",
        f"{RES}/{{name}}/compare.csv",
        f"{RES}/{{name}}/compare.png",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("quant_compare")) or "no-quant_compare-recipes",
    conda:
        f"{ENVS}/quantize.yaml"
    container:
        image_of("quantize")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "python -m quantune.quantize --recipe {input.recipe} --out {params.out} --config-json {params.cfg:q}"
        " > {log} 2>&1"
