"""The ecovisor (Souza et al., ASPLOS 2023): a REST service that gives each application a virtual energy
system (a share of grid, solar and battery) and power caps on its containers. See docs/ecovisor.md."""
