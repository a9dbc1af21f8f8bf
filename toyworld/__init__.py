"""The toy world difftune is tested and demonstrated on: the synthetic shapes world (render and score), tiny
model builders, and the evaluation that scores a pipeline on it. Not pipelines: nothing here is generation API."""
