"""Jinja model-card templates, installed as package data of `cnc_hf.model_cards` (rendered by cnc_hf.hub)."""
