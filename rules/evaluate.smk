# The evaluate stage: a base model's perplexity (stated context and stride) and greedy generation speed.


use rule stage_step as evaluate with:
    input:
        model=lambda w: model_input(w.name),
        data=lambda w: dataset_input(w.name),
        recipe=lambda w: recipe_path(w.name),
    wildcard_constraints:
        name=names_of("evaluate"),
    resources:
        mem_mb=lambda w: 4000 if SCALE == "tiny" else 40000,
        runtime=lambda w: 20 if SCALE == "tiny" else 120,
        gpu=lambda w: gpu_count(w.name),
