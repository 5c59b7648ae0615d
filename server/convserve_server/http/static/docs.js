// Swagger UI over convserve's own OpenAPI document; every file comes from this server.
window.ui = SwaggerUIBundle({
  url: "/v2/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
});
