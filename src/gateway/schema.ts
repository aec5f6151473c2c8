import { z } from 'zod';

/**
 * The compiled ingress of the mesh: every accepted Gateway of this project's
 * GatewayClasses with its listeners grouped by port, the attached HTTPRoutes
 * resolved (backends to endpoints, certificates to PEM) and their matches
 * already in the spec's precedence order, per hostname. Part of every
 * NodePolicy (src/policy/schema.ts GlobalPart `ingress`); a node serves the
 * Gateways whose `nodes` is null or names it (src/gateway/render.ts).
 *
 * Everything a proxy must decide per request (which hostname bucket, which
 * match wins) is decided here or in render.ts; proxy/gateway.js only walks
 * the lists in order.
 */

const Name = z.string().min(1).max(253);
const Port = z.number().int().min(1).max(65535);

export const IngressValueMatchSchema = z.object({ type: z.enum(['Exact', 'RegularExpression']), name: z.string().min(1), value: z.string() }).strict();

export const IngressMatchSchema = z
  .object({
    /** Index into the port's rules. */
    rule: z.number().int().min(0),
    path: z.object({ type: z.enum(['Exact', 'PathPrefix', 'RegularExpression']), value: z.string() }).strict(),
    method: z.string().nullable(),
    headers: z.array(IngressValueMatchSchema),
    queryParams: z.array(IngressValueMatchSchema),
  })
  .strict();
export type IngressMatch = z.infer<typeof IngressMatchSchema>;

export const IngressEndpointSchema = z
  .object({
    ip: z.string().ip(),
    port: Port,
    /** The node the endpoint runs on (null: unknown, connected directly). */
    node: Name.nullable(),
    /** ns/serviceAccount of the pod, when known. */
    identity: z.string().nullable(),
  })
  .strict();

export const IngressBackendSchema = z
  .object({
    /** ns/name of the Service. */
    service: z.string(),
    port: Port.nullable(),
    weight: z.number().int().min(0),
    /** Ready endpoints; empty: 503. */
    endpoints: z.array(IngressEndpointSchema),
    /** Set when the reference does not resolve: requests sent to this backend get 500 (the spec's rule for invalid backends). */
    problem: z.string().nullable(),
  })
  .strict();
export type IngressBackend = z.infer<typeof IngressBackendSchema>;

const HeaderModifierSchema = z
  .object({
    set: z.array(z.object({ name: z.string(), value: z.string() }).strict()),
    add: z.array(z.object({ name: z.string(), value: z.string() }).strict()),
    remove: z.array(z.string()),
  })
  .strict();

const PathModifierSchema = z.object({ type: z.enum(['ReplaceFullPath', 'ReplacePrefixMatch']), value: z.string() }).strict();

export const IngressRuleSchema = z
  .object({
    /** ns/name of the HTTPRoute and the rule's index, for logs and metrics. */
    route: z.string(),
    index: z.number().int().min(0),
    requestHeaders: HeaderModifierSchema.nullable(),
    responseHeaders: HeaderModifierSchema.nullable(),
    redirect: z
      .object({
        scheme: z.enum(['http', 'https']).nullable(),
        hostname: z.string().nullable(),
        path: PathModifierSchema.nullable(),
        port: Port.nullable(),
        statusCode: z.number().int(),
      })
      .strict()
      .nullable(),
    rewrite: z.object({ hostname: z.string().nullable(), path: PathModifierSchema.nullable() }).strict().nullable(),
    mirrors: z.array(IngressBackendSchema),
    backends: z.array(IngressBackendSchema),
    requestTimeoutMs: z.number().int().min(1).nullable(),
    backendRequestTimeoutMs: z.number().int().min(1).nullable(),
  })
  .strict();
export type IngressRule = z.infer<typeof IngressRuleSchema>;

export const IngressHostSchema = z
  .object({
    /** "a.example.com", "*.example.com", or "*" (any host). */
    hostname: z.string().min(1),
    /** In precedence order: the first that matches a request wins. */
    matches: z.array(IngressMatchSchema),
  })
  .strict();
export type IngressHost = z.infer<typeof IngressHostSchema>;

export const IngressCertificateSchema = z
  .object({
    /** The listener hostname the certificate serves by SNI; null: the listener has none (any name, and clients without SNI). */
    hostname: z.string().nullable(),
    /** ns/name of the Secret. */
    secret: z.string(),
    certPem: z.string().min(1),
    keyPem: z.string().min(1),
  })
  .strict();
export type IngressCertificate = z.infer<typeof IngressCertificateSchema>;

export const IngressPortSchema = z
  .object({
    port: Port,
    protocol: z.enum(['HTTP', 'HTTPS']),
    /** Names of the listeners served on this port. */
    listeners: z.array(z.string()),
    /** HTTPS: one per listener hostname, most specific first. */
    certificates: z.array(IngressCertificateSchema),
    /** Most specific first: exact names, then wildcards by length, then "*". */
    hosts: z.array(IngressHostSchema),
    rules: z.array(IngressRuleSchema),
  })
  .strict();
export type IngressPort = z.infer<typeof IngressPortSchema>;

export const IngressGatewaySchema = z
  .object({
    namespace: Name,
    name: Name,
    /** The identity the gateway's traffic into the mesh carries (mTLS, TrafficTargets). */
    identity: z.object({ namespace: Name, serviceAccount: Name }).strict(),
    /** Nodes that serve it; null = every node. */
    nodes: z.array(Name).nullable(),
    ports: z.array(IngressPortSchema),
  })
  .strict();
export type IngressGateway = z.infer<typeof IngressGatewaySchema>;

/**
 * A condition of a Gateway API object that is not as it should be (src/gateway/problems.ts),
 * for `fsm-node status`; cluster mode also writes it to the object's status.
 */
export const IngressProblemSchema = z
  .object({
    /** "Gateway edge/gw", "Gateway edge/gw listener https", "HTTPRoute app/r on edge/gw/http". */
    object: z.string(),
    type: z.string(),
    status: z.string(),
    reason: z.string(),
    message: z.string(),
  })
  .strict();
export type IngressProblem = z.infer<typeof IngressProblemSchema>;

/** `problems` only when there are any (policies of meshes without them do not change). */
export const IngressSchema = z.object({ gateways: z.array(IngressGatewaySchema), problems: z.array(IngressProblemSchema).optional() }).strict();
export type Ingress = z.infer<typeof IngressSchema>;

export const EMPTY_INGRESS: Ingress = { gateways: [] };
