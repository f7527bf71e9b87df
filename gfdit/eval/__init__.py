"""`gfdit eval`: paper-scale evaluation in the simulator (`sweep`) and the simulator's measured error
against real servers (`fidelity`)."""
