"""Library code shared by the pgcg consumer and coordinator."""
