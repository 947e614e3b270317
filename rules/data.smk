# Data preparation: the data_clean stage, and the tiny raw data set it cleans.


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
        "python -m quantune.tiny_world raw-instructions --out {output} --seed {params.seed} > {log} 2>&1"


use rule stage_step as clean_data with:
    input:
        data=lambda w: dataset_input(w.name),
        tokenizer=lambda w: model_input(w.name, "tokenizer_model"),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("clean_data"),
    threads: 1
    resources:
        mem_mb=lambda w: 2000 if SCALE == "tiny" else 16000,
        runtime=lambda w: 10 if SCALE == "tiny" else 120,
        gpu=0,
    params:
        step="clean_data",
