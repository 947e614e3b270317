# Seed 004's export chain (issue 6): LoRA adapter -> merged transformers model (merge) -> GGUF f16 with
# llama.cpp's converter (gguf_convert) -> Q4_0 / Q8_0 / Q4_K_M with llama_model_quantize (gguf_quantize)
# -> llama-cpp-python perplexity, speed and generations beside the transformers model (gguf_eval; the rule
# is gguf_evaluate, since the recipe gguf_eval is itself a target rule).
# Each recipe names the target it reads (adapter / merged / gguf / ggufs + reference); those references are
# checked here, before any job runs.


rule merge:
    input:
        model=lambda w: model_input(w.name),
        adapter=lambda w: _done(RECIPES[w.name]["adapter"]),
        data=lambda w: dataset_input(w.name, "check_dataset"),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("merge")) or "no-merge-recipes",
    conda:
        f"{ENVS}/llamacpp.yaml"
    container:
        image_of("llamacpp")
    threads: 2
    resources:
        mem_mb=lambda w: 3000 if SCALE == "tiny" else 24000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "export OMP_NUM_THREADS={threads}; "
        + GPU_RUN
        + "python -m quantune.export merge --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule gguf_convert:
    input:
        merged=lambda w: _done(RECIPES[w.name]["merged"]),
        data=lambda w: dataset_input(w.name, "check_dataset"),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("gguf_convert")) or "no-gguf_convert-recipes",
    conda:
        f"{ENVS}/llamacpp.yaml"
    container:
        image_of("llamacpp")
    threads: 2
    resources:
        mem_mb=lambda w: 3000 if SCALE == "tiny" else 16000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "export OMP_NUM_THREADS={threads}; "
        + GPU_RUN
        + "python -m quantune.export convert --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule gguf_quantize:
    input:
        gguf=lambda w: _done(RECIPES[w.name]["gguf"]),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("gguf_quantize")) or "no-gguf_quantize-recipes",
    conda:
        f"{ENVS}/llamacpp.yaml"
    container:
        image_of("llamacpp")
    threads: 2
    resources:
        mem_mb=lambda w: 2000 if SCALE == "tiny" else 8000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        f"{GPU_RUN}python -m quantune.export quantize --recipe {{input.recipe}} --out {{params.out}}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule gguf_evaluate:
    input:
        ggufs=lambda w: [_done(t) for t in RECIPES[w.name]["ggufs"]],
        reference=lambda w: _done(RECIPES[w.name]["reference"]),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("gguf_eval")) or "no-gguf_eval-recipes",
    conda:
        f"{ENVS}/llamacpp.yaml"
    container:
        image_of("llamacpp")
    threads: 2
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 32000,
        runtime=lambda w: 20 if SCALE == "tiny" else 120,
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "export OMP_NUM_THREADS={threads}; "
        + GPU_RUN
        + "python -m quantune.gguf_eval --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"
