# The evaluate stage: a base model's perplexity (stated context and stride) and greedy generation speed.


rule evaluate:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("evaluate")) or "no-evaluate-recipes",
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    threads: 2
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 40000,
        runtime=lambda w: 20 if SCALE == "tiny" else 120,
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        GPU_RUN + "python -m quantune.evaluate --recipe {input.recipe} --out {params.out} --config-json {params.cfg:q}"
        " > {log} 2>&1"
