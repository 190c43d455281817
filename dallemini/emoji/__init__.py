"""The built-in emoji-scenes domain: the dataset, its judge, evaluation, the recipe that makes the
default model, the VQGAN trainer extension it uses, and the `dallemini` commands for them."""
