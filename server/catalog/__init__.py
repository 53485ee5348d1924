"""The Peewee catalog shared by the AE, the web app and the AI worker."""
