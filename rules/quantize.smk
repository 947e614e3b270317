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


def quant_recipes(gptqmodel):
    return [n for n in recipes_of("quantize") if (backend_of(RECIPES[n]) == "gptqmodel") == gptqmodel]


def quant_inputs(name):
    """The model, the calibration data (calibrated methods) and the evaluation data, where they are local."""
    r = RECIPES[name]
    out = {"model": model_input(name), "eval": dataset_input(name, "eval_dataset"), "recipe": recipe_path(name)}
    if "calibration_dataset" in r:
        out["calibration"] = dataset_input(name, "calibration_dataset")
    return out


def quant_mem_mb(name):
    return 4000 if SCALE == "tiny" else int(RECIPES[name].get("mem_mb", 64000))


rule quantize:
    input:
        unpack(lambda w: quant_inputs(w.name)),
    output:
        f"{RES}/{{name}}/metrics.json",
    wildcard_constraints:
        name="|".join(quant_recipes(False)) or "no-quantize-recipes",
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    conda:
        f"{ENVS}/quantize.yaml"
    container:
        image_of("quantize")
    threads: 2
    resources:
        mem_mb=lambda w: quant_mem_mb(w.name),
        runtime=lambda w: 30 if SCALE == "tiny" else 240,
        gpu=lambda w: gpu_count(w.name),
    shell:
        "export OMP_NUM_THREADS={threads}; " + GPU_RUN + "python -m quantune.quantize --recipe {input.recipe}"
        " --out {params.out} --config-json {params.cfg:q} > {log} 2>&1"


rule quantize_gptqmodel:
    input:
        unpack(lambda w: quant_inputs(w.name)),
    output:
        f"{RES}/{{name}}/metrics.json",
    wildcard_constraints:
        name="|".join(quant_recipes(True)) or "no-quantize_gptqmodel-recipes",
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    conda:
        f"{ENVS}/gptqmodel.yaml"
    container:
        image_of("gptqmodel")
    threads: 2
    resources:
        mem_mb=lambda w: quant_mem_mb(w.name),
        runtime=lambda w: 30 if SCALE == "tiny" else 240,
        gpu=lambda w: max(1, gpu_count(w.name)),
    shell:
        "export OMP_NUM_THREADS={threads}; " + GPU_RUN + "python -m quantune.quantize --recipe {input.recipe}"
        " --out {params.out} --config-json {params.cfg:q} > {log} 2>&1"


rule quantize_compare:
    input:
        metrics=lambda w: [f"{RES}/{t}/metrics.json" for t in RECIPES[w.name]["targets"]],
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
        f"{RES}/{{name}}/compare.md",
        f"{RES}/{{name}}/compare.csv",
        f"{RES}/{{name}}/compare.png",
    wildcard_constraints:
        name="|".join(recipes_of("quant_compare")) or "no-quant_compare-recipes",
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    conda:
        f"{ENVS}/quantize.yaml"
    container:
        image_of("quantize")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m quantune.quantize --recipe {input.recipe} --out {params.out} --config-json {params.cfg:q}"
        " > {log} 2>&1"
