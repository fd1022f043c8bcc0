"""The shared training machinery every recipe (:mod:`dsjax.recipes`) runs on: the host loop
(`loop.train`), the jitted step (`step`), configs (`config`), initial params (`init`), the
optimizer (`optim`), logging (`metrics`) and the recipe interface (`recipe`). Submodules are
imported on demand."""
