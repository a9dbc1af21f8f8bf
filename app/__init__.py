"""The local web app (`difftune-ui`): set up, start, watch and compare training runs; try and push results."""
