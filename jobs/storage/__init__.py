"""The Delta tables: the table store (one interface, one module per engine), schemas, event parsing, ingestion."""
