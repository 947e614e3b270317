# LoRA / QLoRA supervised fine-tuning (stage lora_sft) and the comparison of trained adapters against each
# other and the untuned base (stage lora_compare). Issue 4: qlora_chatglm_{steps100,linear,cosine}, qlora_compare.
# A job's env: envs/finetune.yaml, or envs/chatglm3.yaml for `env: chatglm3` recipes at full scale
# (quantune.finetune.workflow_env says why); the image is the env's.
from quantune.finetune import adapter_targets, workflow_env, workflow_runtime

LORA_ENVS = {"finetune": f"{ENVS}/finetune.yaml", "chatglm3": f"{ENVS}/chatglm3.yaml"}
try:  # an adapter that is not a lora_sft target stops the workflow before any job runs
    LORA_ADAPTERS = {n: adapter_targets(RECIPES, n, recipe_path(n)) for n in recipes_of("lora_compare")}
except QuantuneError as _e:
    sys.stderr.write(f"quantune: error: {_e}\n")
    sys.exit(1)


rule lora_sft:
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
        name="|".join(recipes_of("lora_sft")) or "no-lora-sft-recipes",
    conda:
        lambda w: LORA_ENVS[workflow_env(RECIPES[w.name], SCALE)]
    container:
        lambda w: image_of(workflow_env(RECIPES[w.name], SCALE))
    threads: 2
    resources:
        # a 6B model in NF4 is ~4 GB on the GPU; the host holds a bf16 shard at a time while quantizing
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 48000,
        runtime=lambda w: workflow_runtime(RECIPES[w.name], SCALE),
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        f"{GPU_RUN}python -m quantune.finetune train --recipe {{input.recipe}} --out {{params.out}}"
        " --config-json {params.cfg:q} > {log} 2>&1"


rule lora_compare:
    input:
        adapters=lambda w: [f"{RES}/{t}/metrics.json" for t in LORA_ADAPTERS[w.name]],
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
        name="|".join(recipes_of("lora_compare")) or "no-lora-compare-recipes",
    conda:
        lambda w: LORA_ENVS[workflow_env(RECIPES[w.name], SCALE)]
    container:
        lambda w: image_of(workflow_env(RECIPES[w.name], SCALE))
    threads: 2
    resources:
        mem_mb=lambda w: 6000 if SCALE == "tiny" else 48000,
        runtime=lambda w: workflow_runtime(RECIPES[w.name], SCALE),
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        f"{GPU_RUN}python -m quantune.finetune compare --recipe {{input.recipe}} --out {{params.out}}"
        " --config-json {params.cfg:q} > {log} 2>&1"


# Stage lora_sweep (seed 002's rank sweep): one lora_sft run per rank of the recipe's `ranks` (wildcard {rank}),
# into results/<target>/r<rank>/, then the table and plot over the ranks in results/<target>/.


rule lora_sweep_run:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/r{{rank}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}_r{{rank}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}_r{{rank}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("lora_sweep")) or "no-lora-sweep-recipes",
        rank=r"\d+",
    conda:
        f"{ENVS}/finetune.yaml"
    container:
        image_of("finetune")
    threads: 2
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 16000,
        runtime=lambda w: workflow_runtime(RECIPES[w.name], SCALE),
        gpu=lambda w: gpu_count(w.name),
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}/r{w.rank}",
    shell:
        f"{GPU_RUN}python -m quantune.finetune sweep-run --rank {{wildcards.rank}} --recipe {{input.recipe}}"
        " --out {params.out} --config-json {params.cfg:q} > {log} 2>&1"


rule lora_sweep:
    input:
        runs=lambda w: [f"{RES}/{w.name}/r{k}/metrics.json" for k in RECIPES[w.name]["ranks"]],
        recipe=lambda w: recipe_path(w.name),
    output:
        f"{RES}/{{name}}/metrics.json",
    log:
        f"{RES}/logs/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/{{name}}.tsv"
    wildcard_constraints:
        name="|".join(recipes_of("lora_sweep")) or "no-lora-sweep-recipes",
    conda:
        f"{ENVS}/finetune.yaml"
    container:
        image_of("finetune")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        cfg=CONFIG_JSON,
        out=lambda w: f"{RES}/{w.name}",
    shell:
        "python -m quantune.finetune sweep --recipe {input.recipe} --out {params.out}"
        " --config-json {params.cfg:q} > {log} 2>&1"
