"""lmforge.peft."""
