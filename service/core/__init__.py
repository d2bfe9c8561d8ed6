"""Service settings (`Settings`, from MOEDISCO_* variables) and the database engine: what every other part uses."""
