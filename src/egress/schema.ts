import { z } from 'zod';

/**
 * The mesh's Egress policies as the NodePolicy carries them (GlobalPart
 * `egressPolicies`, absent when there are none): the same for every node;
 * each proxy uses the rules of its own pods' identities (render.ts).
 */
export const EgressPolicySchema = z
  .object({
    namespace: z.string().min(1),
    name: z.string().min(1),
    sources: z.array(z.object({ namespace: z.string().min(1), serviceAccount: z.string().min(1) }).strict()),
    hosts: z.array(z.string().min(1)),
    ipAddresses: z.array(z.string().cidr()),
    ports: z.array(z.object({ number: z.number().int().min(1).max(65535), protocol: z.enum(['http', 'https', 'tcp']) }).strict()).min(1),
  })
  .strict();
export type EgressPolicy = z.infer<typeof EgressPolicySchema>;
