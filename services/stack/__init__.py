"""`lmx up`, `lmx down`, `lmx ps`: the whole stack as supervised local processes."""
