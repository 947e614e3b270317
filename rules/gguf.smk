# The export chain: LoRA adapter -> merged transformers model (merge) -> GGUF f16 with llama.cpp's converter
# (gguf_convert) -> Q4_0 / Q8_0 / Q4_K_M with llama_model_quantize (gguf_quantize) -> llama-cpp-python
# perplexity, speed and generations beside the transformers model (gguf_eval; the rule is gguf_evaluate, since
# the recipe gguf_eval is itself a target rule). Each recipe names the target it reads (adapter / merged / gguf /
# ggufs + reference); config.load_recipes checks those references before any job runs.


use rule stage_step as merge with:
    input:
        model=lambda w: model_input(w.name),
        adapter=lambda w: read_targets(w.name),
        data=lambda w: dataset_input(w.name, "check_dataset"),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("merge"),
    conda:
        f"{ENVS}/llamacpp.yaml"
    container:
        image_of("llamacpp")
    resources:
        mem_mb=lambda w: 3000 if SCALE == "tiny" else 24000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="merge",


use rule merge as gguf_convert with:
    input:
        merged=lambda w: read_targets(w.name),
        data=lambda w: dataset_input(w.name, "check_dataset"),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("gguf_convert"),
    resources:
        mem_mb=lambda w: 3000 if SCALE == "tiny" else 16000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="gguf_convert",


use rule merge as gguf_quantize with:
    input:
        gguf=lambda w: read_targets(w.name),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("gguf_quantize"),
    resources:
        mem_mb=lambda w: 2000 if SCALE == "tiny" else 8000,
        runtime=lambda w: 10 if SCALE == "tiny" else 60,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="gguf_quantize",


use rule merge as gguf_evaluate with:
    input:
        targets=lambda w: read_targets(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("gguf_evaluate"),
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 32000,
        runtime=lambda w: 20 if SCALE == "tiny" else 120,
        gpu=lambda w: gpu_count(w.name),
    params:
        step="gguf_evaluate",
