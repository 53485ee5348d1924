"""Users, roles and tokens of the JSON API (shared/spec/workstation-api.md, Authentication)."""
