# Data preparation (seed 002): the data_clean stage, and the tiny raw data set it cleans.


rule tiny_raw_instructions:
    output:
        directory(f"{TW}/data/zh_instructions_raw"),
    log:
        f"{TW}/logs/tiny_raw_instructions.log",
    benchmark:
        f"{TW}/benchmarks/tiny_raw_instructions.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        seed=CFG["tiny_data"]["seed"],
    shell:
        "python -m quantune.clean make-raw --out {output} --seed {params.seed} > {log} 2>&1"


rule clean_data:
    input:
        data=lambda w: dataset_input(w.name),
        tokenizer=lambda w: model_input(w.name, "tokenizer_model"),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("data_clean")) or "no-data-clean-recipes",
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=lambda w: 2000 if SCALE == "tiny" else 16000,
        runtime=lambda w: 10 if SCALE == "tiny" else 120,
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "python -m quantune.clean run --recipe {input.recipe} --out {params.out} --config-json {params.cfg:q}"
        " > {log} 2>&1"
