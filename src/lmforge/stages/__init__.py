"""One module per stage. Each defines a root recipe dataclass `Config` (with `STAGE`) and `main(cfg)`."""
