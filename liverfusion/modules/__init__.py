"""LightningModules: a base SSL module (optimiser, schedule, monitors, export), SimSiam, and the fusion classifier."""
