# The shape world (scale shape): the real architectures and sizes with random weights, a tokenizer of each model's
# real vocabulary size, and every data set in its real format at the real row counts and token lengths, built from
# the tiny world's corpus (src/quantune/shape_world.py). The full recipes then run on it through their own rules.


rule shape_tokenizer:
    input:
        f"{TW}/data/tiny_text",
    output:
        directory(f"{SW}/tokenizer"),
    log:
        f"{SW}/logs/shape_tokenizer.log",
    benchmark:
        f"{SW}/benchmarks/shape_tokenizer.tsv"
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        vocab=CFG["shape_world"]["tokenizer_vocab"],
    shell:
        "python -m quantune.shape_world tokenizer --corpus {input} --vocab-size {params.vocab} --out {output}"
        " > {log} 2>&1"


rule shape_model:
    input:
        tokenizer=rules.shape_tokenizer.output,
        config=lambda w: shape_config_of(CFG, w.model),
    output:
        directory(f"{SW}/models/{{model}}"),
    log:
        f"{SW}/logs/shape_model_{{model}}.log",
    benchmark:
        f"{SW}/benchmarks/shape_model_{{model}}.tsv"
    wildcard_constraints:
        model="|".join(map(re.escape, CFG["models"])),
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    threads: 2
    resources:
        # initialised on the GPU where the job holds one, in the checkpoint's dtype; saved from there
        mem_mb=32000,
        runtime=30,
        gpu=1,
    params:
        seed=CFG["shape_world"]["seed"],
    shell:
        "export OMP_NUM_THREADS={threads}; "
        + GPU_RUN
        + "python -m quantune.shape_world model --config {input.config} --tokenizer {input.tokenizer}"
        " --out {output} --seed {params.seed} > {log} 2>&1"


rule shape_dataset:
    input:
        tokenizer=rules.shape_tokenizer.output,
        corpus=f"{TW}/data/tiny_text",
    output:
        directory(f"{SW}/data/{{dataset}}"),
    log:
        f"{SW}/logs/shape_dataset_{{dataset}}.log",
    benchmark:
        f"{SW}/benchmarks/shape_dataset_{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(map(re.escape, CFG["shape_world"]["data"])),
    conda:
        f"{ENVS}/train.yaml"
    container:
        image_of("train")
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        spec=lambda w: json.dumps(CFG["shape_world"]["data"][w.dataset], sort_keys=True),
        seed=CFG["shape_world"]["seed"],
    shell:
        "python -m quantune.shape_world dataset {wildcards.dataset} --spec {params.spec:q} --tokenizer"
        " {input.tokenizer} --corpus {input.corpus} --out {output} --seed {params.seed} > {log} 2>&1"
