"""The shipped YAML configs (demos, bases, hardware presets, accelerate configs, comparison budgets) as package
data: `difftune.core.paths.shipped_config` finds one by name, so `--config gpu-8gb` works outside a checkout."""
