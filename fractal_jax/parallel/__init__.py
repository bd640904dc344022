"""Device meshes, parameter shardings and multi-host start-up."""
