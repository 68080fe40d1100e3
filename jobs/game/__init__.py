"""The GAME model on Spark: the fixed effect and the random effects as coordinates, generations, incremental updates."""
