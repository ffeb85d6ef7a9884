"""zipfline pipelines: the flow graph, the CLI, config, tracking."""
